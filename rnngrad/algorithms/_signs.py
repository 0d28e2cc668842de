"""Random +-1 signs for the forward-mode estimators (UORO, KF-RTRL), drawn a block of
``BLOCK`` steps at a time.

One generator call fills a whole block: ``randint`` draws 56 random bits per int64 word
(the range 2^56 is a power of two, so every bit is a fair coin), each byte becomes eight
signs through a 256 x 8 table (one gather), about 7 ns a sign on one CPU core against
about 18 ns for ``randint(0, 2)`` per sign. The online step takes the block's rows one
step at a time (``take``); a whole-sequence path draws the same blocks (``blocks``) and
so consumes the generator exactly as ``T`` online steps after ``init`` do, on any device:
both paths see the same signs and emit the same numbers. A block's unused rows are
dropped at the next ``init`` (a new sequence starts a new block).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["BLOCK", "draw", "take", "blocks", "compile_io"]

BLOCK = 32  # steps per draw
_BYTES = slice(0, 7) if sys.byteorder == "little" else slice(1, 8)  # the 56 random bits
_TABLES: dict = {}


def _table(like: Tensor) -> Tensor:
    key = (like.dtype, str(like.device))
    t = _TABLES.get(key)
    if t is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        t = (bits * 2 - 1).to(dtype=like.dtype, device=like.device)
        _TABLES[key] = t
    return t


def draw(gen: torch.Generator, steps: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """(steps, *shape) independent +-1 entries in ``like``'s dtype and device, from one
    generator call."""
    n = steps
    for s in shape:
        n *= s
    m = -(-n // 56)
    words = torch.randint(0, 1 << 56, (m,), generator=gen, device=like.device)
    idx = words.view(torch.uint8).view(m, 8)[:, _BYTES].reshape(-1).long()
    return torch.nn.functional.embedding(idx, _table(like)).view(-1)[:n].view(steps, *shape)


def take(gen: torch.Generator, buf: Tensor | None, pos: int, like: Tensor
         ) -> tuple[Tensor, int, Tensor]:
    """The next step's signs from the block ``buf`` (BLOCK, *shape) at row ``pos``; a fresh
    block (one call) when it is used up. Returns ``(buf, pos + 1, signs (*shape))``."""
    if buf is None:  # a state saved before signs came in blocks
        raise ValueError("this online state has no block of random signs (saved by an older "
                         "rnngrad?); start it again with the algorithm's init")
    if pos >= buf.shape[0]:
        buf.copy_(draw(gen, buf.shape[0], tuple(buf.shape[1:]), like))
        pos = 0
    return buf, pos + 1, buf[pos]


def blocks(gen: torch.Generator, T: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """(T, *shape): the signs ``T`` online steps after ``init`` take, block by block."""
    parts = [draw(gen, BLOCK, shape, like) for _ in range(-(-T // BLOCK))]
    return torch.cat(parts)[:T] if len(parts) > 1 else parts[0][:T]


def compile_io(generator):
    """The ``(before, after)`` pair ``rnngrad.compile`` runs around a compiled step of a rule
    whose state holds a block of signs (``signs``, ``sign_pos``): ``before`` draws a fresh
    block when the last is used up (eagerly: a ``torch.Generator`` is not traced) and hands
    the step the one row it takes, as a one-row block at position 0, so that the compiled
    graph sees the same Python number at every step (no recompilation per position);
    ``after`` puts the whole block and the next position back. The draws, and so the
    numbers, are the eager step's. ``generator(state)``: the rule's generator."""

    def before(state):
        buf, pos = state.signs, state.sign_pos
        if buf is None:
            return state, None  # refused by the step itself (an older state)
        if pos >= buf.shape[0]:
            buf.copy_(draw(generator(state), buf.shape[0], tuple(buf.shape[1:]), buf))
            pos = 0
        return state._replace(signs=buf.narrow(0, pos, 1), sign_pos=0), (buf, pos)

    def after(new, ctx):
        if ctx is None:
            return new
        buf, pos = ctx
        return new._replace(signs=buf, sign_pos=pos + 1)

    return before, after
