"""mkdocs hooks of `make docs` (mkdocs.yml names this file).

The pages of docs/ show plots kept beside the benchmark scripts (``../benchmarks/*.png``),
outside the docs directory, which mkdocs can only report as missing. Here every relative
link of a page is checked instead (a warning, so an error under ``--strict``, when its
target does not exist), and each file outside docs/ that a page links to is copied into
the site, at the address the link resolves to from the page's URL.
"""

from __future__ import annotations

import logging
import posixpath
import re
import shutil
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.rnngrad")
_LINK = re.compile(r"\]\(\s*<?([^)\s>#]+)(?:#[^)\s]*)?>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_copies: dict[str, Path] = {}  # site path -> file of the repository


def on_pre_build(config) -> None:
    _copies.clear()


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs = Path(config.docs_dir).resolve()
    root = docs.parent
    here = (docs / page.file.src_uri).parent
    for m in _LINK.finditer(_FENCE.sub("", markdown)):
        link = m.group(1)
        if "://" in link or link.startswith(("mailto:", "/")):
            continue
        target = (here / link).resolve()
        if not target.exists():
            log.warning(f"{page.file.src_uri}: the link {link!r} points to {target}, which "
                        f"does not exist")
        elif not target.is_relative_to(docs):
            if not target.is_relative_to(root) or not target.is_file():
                log.warning(f"{page.file.src_uri}: the link {link!r} leaves the repository "
                            f"or names a folder outside docs/")
                continue
            dest = posixpath.normpath(posixpath.join(page.url or ".", link))
            if dest.startswith(".."):
                log.warning(f"{page.file.src_uri}: the link {link!r} resolves above the site")
                continue
            _copies[dest] = target
    return markdown


def on_post_build(config) -> None:
    site = Path(config.site_dir)
    for dest, source in _copies.items():
        (site / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, site / dest)
