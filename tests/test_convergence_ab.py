"""scripts/convergence_ab.py: the report's arithmetic, and the A/B end to end on CPU (tiny model, the committed sample of
the open corpus, BF16 vs FP8-Flow emulated), including a run stopped by --exit-duration-in-mins and resumed exactly."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("convergence_ab", ROOT / "scripts" / "convergence_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ab = _load_script()


def _rows(losses, val_every=2, val=None, health=None):
    rows = []
    for i, loss in enumerate(losses, 1):
        row = {"iteration": i, "loss": loss}
        if i % val_every == 0:
            row["val_loss"] = val if val is not None else loss
            row["tokens_per_s"] = 100.0 * i
            row["health"] = dict(health or {"dead_expert_frac": 0.0, "load_imbalance": 1.5, "router_grad_norm": 1e-3})
        rows.append(row)
    return rows


def test_relative_and_moving_average():
    assert ab.relative(1.01, 1.0) == pytest.approx(0.01)
    assert math.isnan(ab.relative(float("nan"), 1.0)) and math.isnan(ab.relative(1.0, 0.0))
    assert ab.moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_final_loss_is_the_mean_of_the_last_window():
    s = ab.summarize_mode(_rows([5.0, 4.0, 3.0, 2.0]), final_window=2)
    assert s["final_train_loss"] == 2.5 and s["final_window"] == 2 and s["final_val_loss"] == 2.0
    assert s["steps"] == 4 and s["nonfinite_losses"] == 0


@pytest.mark.parametrize(
    "flow_loss, flow_dead, met",
    [(2.004, 0.0, {"train_vs_bf16": True, "train_vs_te_blockwise": False, "dead_experts": True}),
     (1.98, 0.0, {"train_vs_bf16": False, "train_vs_te_blockwise": False, "dead_experts": True}),
     (2.0, 0.5, {"train_vs_bf16": True, "train_vs_te_blockwise": True, "dead_experts": False})],
)
def test_targets(flow_loss, flow_dead, met):
    bf16 = ab.summarize_mode(_rows([2.0] * 4), 2)
    te = ab.summarize_mode(_rows([2.0] * 4), 2)
    flow = ab.summarize_mode(_rows([flow_loss] * 4, health={"dead_expert_frac": flow_dead, "load_imbalance": 1.5}), 2)
    c = ab.compare({"bf16": bf16, "te_blockwise": te, "fp8flow": flow})["fp8flow"]
    assert c["rel_train_vs_bf16"] == pytest.approx((flow_loss - 2.0) / 2.0)
    for key, value in met.items():
        assert c[f"target_{key}"] is value, key
    assert "target_train_vs_bf16" not in ab.compare({"bf16": bf16, "te_blockwise": te})["te_blockwise"]


def test_runs_are_compared_at_the_common_iteration():
    runs = {"bf16": _rows([3.0, 2.0, 1.0]), "fp8flow": _rows([3.0, 2.5])}
    cut = ab.common_prefix(runs)
    assert [r["iteration"] for r in cut["bf16"]] == [1, 2] and len(cut["fp8flow"]) == 2


def _trainer_flags(corpus):
    return ["--lr-warmup-iters", "1", "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "1",
            "--train-data-path", str(corpus / "open_corpus_train"), "--valid-data-path", str(corpus / "open_corpus_valid")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from fp8flow_megatron.data import open_corpus

    out = tmp_path_factory.mktemp("ab") / "open-corpus"
    open_corpus.main(["--output-dir", str(out), "--sample"])
    return out


@pytest.mark.slow
def test_ab_end_to_end_on_cpu(corpus, tmp_path, capsys):
    out = tmp_path / "ab"
    argv = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--steps", "4", "--modes", "bf16,fp8flow",
            "--parallel", "--final-window", "2", "--out", str(out), "--", *_trainer_flags(corpus)]
    assert ab.main(argv) == 0
    report = json.loads((out / "summary.json").read_text())
    assert report["compared_at"] == 4 and set(report["modes"]) == {"bf16", "fp8flow"}
    flow = report["modes"]["fp8flow"]
    for site in ab.FP8_SITES:
        assert f"underflow_frac/{site}" in flow, site
    assert "underflow_frac/tokens" not in report["modes"]["bf16"]
    assert math.isfinite(report["comparison"]["fp8flow"]["rel_val_vs_bf16"])
    rows = [json.loads(line) for line in (out / "fp8flow" / "metrics.jsonl").read_text().splitlines()]
    assert "underflow_frac/layer1/dswiglu_out" in rows[1]["health"] and "layer2/router_grad_norm" in rows[1]["health"]
    assert (out / "summary.md").read_text().startswith("| mode |")
    try:
        import matplotlib  # noqa: F401

        assert (out / "convergence_ab.png").stat().st_size > 10_000
    except ImportError:
        pass
    capsys.readouterr()
    assert ab.main(argv) == 0  # complete modes are not trained again
    assert capsys.readouterr().out.count("already complete") == 2


@pytest.mark.slow
def test_a_stopped_ab_resumes_exactly(corpus, tmp_path):
    def run(out, *extra, checkpoint=True):
        argv = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--steps", "4", "--modes", "fp8flow",
                "--final-window", "2", "--out", str(out)] + (["--checkpoint-interval", "2"] if checkpoint else [])
        return ab.main(argv + ["--", *_trainer_flags(corpus), *extra])

    assert run(tmp_path / "stopped", "--exit-duration-in-mins", "1e-6") == 0  # stops after iteration 1, saves
    stopped = ab.load_metrics(tmp_path / "stopped" / "fp8flow")
    assert [r["iteration"] for r in stopped] == [1]
    assert run(tmp_path / "stopped") == 0  # resumes from the checkpoint of iteration 1
    assert run(tmp_path / "straight", checkpoint=False) == 0
    resumed = ab.load_metrics(tmp_path / "stopped" / "fp8flow")
    straight = ab.load_metrics(tmp_path / "straight" / "fp8flow")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in straight]

