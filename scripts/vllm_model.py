#!/usr/bin/env python3
"""Copy a (dequantized) safetensors model directory into a form vLLM accepts, and print its path.

vLLM refuses a config.json that still carries a GGUF ``quantization_config``
("Unknown quantization method: gguf"); the copy drops that key. Everything else is copied as is.
Stdlib only, so either virtualenv's python (or the system one) can run it.

Usage: python scripts/vllm_model.py SOURCE_DIR TARGET_DIR [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

DROP_KEYS = ("quantization_config",)


def prepare(source: Path, target: Path, *, force: bool = False) -> Path:
    source = source.expanduser().resolve()
    target = target.expanduser().resolve()
    config_path = source / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"error: {source} has no config.json")
    if not any(source.glob("*.safetensors")):
        raise SystemExit(f"error: {source} has no *.safetensors file")
    if target == source:
        raise SystemExit("error: TARGET_DIR must differ from SOURCE_DIR")
    if (target / "config.json").is_file() and not force:
        return target  # already prepared (copies are written whole, then renamed into place)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-vllm-model-", dir=target.parent))
    try:
        for item in source.iterdir():
            if item.name == "config.json" or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in DROP_KEYS:
            config.pop(key, None)
        (tmp / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", type=Path, help="safetensors model directory (e.g. the llm-aligner GGUF cache)"
    )
    parser.add_argument("target", type=Path, help="directory to create for vLLM")
    parser.add_argument("--force", action="store_true", help="re-copy even if TARGET_DIR is already prepared")
    args = parser.parse_args(argv)
    print(prepare(args.source, args.target, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
