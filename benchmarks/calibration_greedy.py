"""What the calibrate stage's methods do to greedy answers: for a stored trained adapter, the stage
itself (`tasks.calibrate.run_calibration`, into the same store) at `temperature` and at
`method=vector` with each `--l2`, then the calibrated adapter on its 4-bit base evaluated greedily
on the test split as the report's `trained` row is. The figures behind README "Calibration".

    .venv/bin/python benchmarks/calibration_greedy.py --dataset datasets/<key> \\
        --quantized models/quantized/<key> --adapter adapters/<key> --l2 3 10 30
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stored_adapter beside this file

import stored_adapter  # noqa: E402
from slmforge import modeling as M  # noqa: E402
from slmforge.config import CalibrateConfig, EvalConfig, ModelConfig  # noqa: E402
from slmforge.evaluation import evaluate_model  # noqa: E402
from slmforge.merging import load_trained  # noqa: E402
from slmforge.records import read_jsonl  # noqa: E402
from slmforge.runtime import for_config  # noqa: E402
from slmforge.storage import ArtifactStore  # noqa: E402
from tasks.calibrate import run_calibration  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stored_adapter.add_arguments(ap)
    ap.add_argument("--l2", nargs="*", type=float, default=[3.0, 10.0, 30.0])
    args = ap.parse_args()
    store, eval_cfg, model_cfg = ArtifactStore(args.store.resolve().as_uri()), EvalConfig(), ModelConfig()
    test = read_jsonl(args.store / args.dataset / "test.jsonl")
    tokenizer = M.load_tokenizer(args.store / args.adapter)
    settings = [CalibrateConfig(method="temperature")] + [CalibrateConfig(method="vector", l2=x) for x in args.l2]
    print("| setting | taught key accuracy | EOS stops | test answer loss | validation argmaxes moved |")
    print("|---|---|---|---|---|")
    for cfg in settings:
        out = run_calibration({"key": args.adapter}, {"quantized": {"key": args.quantized}}, {"key": args.dataset}, cfg,
                              eval_cfg, store, log=lambda m: None, model_cfg=model_cfg)
        model = load_trained(args.store / args.quantized, args.store / out["key"], for_config(model_cfg))
        summary = evaluate_model(model, tokenizer, test, eval_cfg.max_new_tokens, eval_cfg.batch_size)["summary"]
        fit = out["calibration"]
        name = "temperature" if cfg.method == "temperature" else f"vector, l2 {cfg.l2:g}"
        print(f"| {name} (T {fit['temperature']:g}) | {summary['by_part']['taught']['key_accuracy']:.1%} | "
              f"{summary['overall']['stopped_with_eos']:.1%} | {summary['overall']['answer_loss']:.3f} | "
              f"{fit.get('argmax_moved', 0)} of {fit.get('tokens', '-')} |", flush=True)


if __name__ == "__main__":
    main()
