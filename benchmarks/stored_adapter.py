"""The trained adapter of an earlier run, read back from the store by the keys `make run` prints:
the arguments and the loading that `adapter_scale.py` and `temperature_sweep.py` share."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slmforge import modeling as M  # noqa: E402
from slmforge.merging import load_trained  # noqa: E402
from slmforge.records import read_jsonl  # noqa: E402
from slmforge.runtime import decide  # noqa: E402


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--store", type=Path, default=Path(".slmforge/store"))
    ap.add_argument("--dataset", required=True, help="store key of the prepared dataset (datasets/...)")
    ap.add_argument("--quantized", required=True, help="store key of the quantized base (models/quantized/...)")
    ap.add_argument("--adapter", required=True, help="store key of the trained adapter (adapters/...)")


def load(args: argparse.Namespace) -> tuple:
    """(the adapter on its 4-bit base, in eval mode; its tokenizer; a function reading a split)."""
    model = load_trained(args.store / args.quantized, args.store / args.adapter, decide())
    tokenizer = M.load_tokenizer(args.store / args.adapter)
    return model, tokenizer, lambda split: read_jsonl(args.store / args.dataset / f"{split}.jsonl")
