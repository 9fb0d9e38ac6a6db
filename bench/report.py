"""Markdown report helpers: marked sections that separate runs can rewrite independently.

A benchmark writes its output between ``<!-- begin:NAME -->`` and ``<!-- end:NAME -->``; a later
run with the same NAME replaces only that block, so e.g. a GPU run and a reduced CPU run (and a
server check) can share one document without clobbering each other.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- begin:{name} -->", f"<!-- end:{name} -->"


def write_section(path: Path, name: str, body: str, title: str = "") -> None:
    """Put ``body`` into the section NAME of the markdown file ``path``, creating either if absent.

    A new file starts with ``title``; a new section is appended at the end; an existing one is
    replaced in place, so the order of the sections is the order they were first written.
    """
    begin, end = _markers(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    path = Path(path)
    if title and not title.lstrip().startswith("#"):
        title = f"# {title.strip()}"
    text = path.read_text() if path.exists() else (f"{title.strip()}\n\n" if title else "")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        # a function, not a string: the body may hold backslashes re.sub would interpret
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def read_section(path: Path, name: str) -> str | None:
    """The body of section NAME of ``path``, or None when the file or the section is missing."""
    path = Path(path)
    if not path.exists():
        return None
    begin, end = _markers(name)
    pattern = re.escape(begin) + r"\n?(.*?)\n?" + re.escape(end)
    match = re.search(pattern, path.read_text(), re.DOTALL)
    return match.group(1) if match else None


def fmt(value: float, digits: int = 1) -> str:
    """A number for a table cell; NaN (not measured) as a dash."""
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are formatted with :func:`fmt`."""

    def cell(value: object) -> str:
        return fmt(value) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that is running, as it could be typed again (``python -m module args``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return shlex.join(head + sys.argv[1:])


def machine(device: torch.device | str = "cpu") -> str:
    """The hardware a number was measured on: the GPU's name, or the CPU model and cores used."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model}, {threads} thread{'s' if threads > 1 else ''} of {os.cpu_count()} cores"
