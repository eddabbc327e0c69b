"""The train-step benchmark: a quick CPU run of the tiny model, its FLOP count, and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clip_train.bench import train as bench_train
from clip_train.models.config import ModelConfig
from clip_train.models.factory import create_model_from_config
from clip_train.models.registry import get_model_config


def vit_clip_macs_per_sample(cfg: ModelConfig) -> tuple[int, int]:
    """Multiply-adds of one forward pass of a ViT CLIP, written out by hand: (all, patch conv)."""
    v, t = cfg.vision, cfg.text

    def blocks(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
        qkv_and_out = tokens * width * 4 * width
        attention = 2 * tokens * tokens * width  # q @ k^T and probabilities @ v
        mlp = 2 * tokens * width * int(width * mlp_ratio)
        return layers * (qkv_and_out + attention + mlp)

    grid = v.image_size // v.patch_size
    patch_conv = grid**2 * 3 * v.patch_size**2 * v.width
    image = patch_conv + blocks(grid**2 + 1, v.width, v.layers[0], v.mlp_ratio) + v.width * cfg.embed_dim
    text = blocks(t.context_length, t.width, t.layers, t.mlp_ratio) + t.width * cfg.embed_dim
    return image + text, patch_conv


def test_counted_flops_match_hand_count() -> None:
    cfg = get_model_config("tiny")
    batch = 3
    flops = bench_train.count_step_flops(cfg, batch)
    macs, patch_conv = vit_clip_macs_per_sample(cfg)
    # Backward costs two forwards per matmul, except that no gradient flows into the input images.
    expected_towers = batch * 2 * (3 * macs - patch_conv)
    assert flops["towers"] == expected_towers
    assert flops["logits"] == 6 * batch**2 * cfg.embed_dim
    assert flops["total"] == flops["towers"] + flops["logits"]


@pytest.mark.parametrize("name", ["tiny", "ViT-B-32", "RN50"])
def test_open_clip_equivalent_has_the_same_parameters(name: str) -> None:
    pytest.importorskip("open_clip")
    cfg = get_model_config(name)
    with torch.device("meta"):
        ours = create_model_from_config(cfg)
        theirs = bench_train.open_clip_model(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_synthetic_captions_end_in_the_end_token() -> None:
    cfg = get_model_config("tiny")
    images, tokens = bench_train.make_batch(cfg, 16, seed=3)
    assert images.shape == (16, 3, cfg.vision.image_size, cfg.vision.image_size)
    assert (tokens[:, 0] == bench_train.START_OF_TEXT).all()
    assert (tokens.argmax(dim=1) > 1).all() and (tokens.max(dim=1).values == bench_train.END_OF_TEXT).all()
    assert torch.equal(tokens, bench_train.make_batch(cfg, 16, seed=3)[1])


def test_tiny_cpu_run_reports_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("open_clip")
    out = tmp_path / "runs.jsonl"
    argv = ["--model", "tiny", "--batch", "8", "--precision", "fp32", "--device", "cpu", "--steps", "2",
            "--warmup", "1", "--no-isolate", "--threads", "1", "--peak-tflops", "0.5", "--out", str(out)]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        bench_train.main(argv)
    finally:
        torch.set_num_threads(threads)  # --no-isolate set it in this process
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("[bench.train] ours") and "samples/s" in line for line in lines[:-1])
    report = json.loads(lines[-1])
    assert report == json.loads(out.read_text().splitlines()[-1])
    assert (report["model"], report["batch"], report["peak_tflops"]) == ("tiny", 8, 0.5)
    assert report["flops_per_step"] == bench_train.count_step_flops(get_model_config("tiny"), 8)["total"]
    results = {r["impl"]: r for r in report["results"]}
    for impl in ("ours", "open_clip"):
        result = results[impl]
        assert "error" not in result, result
        assert result["samples_per_s"] == pytest.approx(8 / result["step_s"])
        assert result["cpu_s_per_step"] > 0
        assert result["mfu"] == pytest.approx(report["flops_per_step"] / result["step_s"] / 0.5e12)
        # Random captions against random images: the loss starts near ln(B) and must stay finite.
        assert 0 < result["loss_value"] < 2 * torch.log(torch.tensor(8.0)).item()
    assert report["ours_vs_open_clip"]["speedup"] == pytest.approx(
        results["open_clip"]["step_s"] / results["ours"]["step_s"]
    )


def test_mfu_is_null_on_cpu_without_a_peak() -> None:
    peak, source = bench_train.peak_tflops("cpu", "fp32", None)
    assert peak is None and "--peak-tflops" in source
    assert bench_train.peak_tflops("cpu", "bf16", 2.0) == (2.0, "--peak-tflops")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "ViT-Z-99"], "--model: unknown model"),
        (["--model", "tiny", "--batch", "0"], "--batch must be at least 1"),
        (["--model", "tiny", "--impl", "ours,fastest"], "--impl: unknown"),
        (["--model", "tiny", "--device", "cpu", "--find-max-batch"], "--find-max-batch needs --device cuda"),
        (["--model", "tiny", "--peak-tflops", "-1"], "--peak-tflops must be positive"),
        (["--model", "tiny", "--threads", "-2"], "--threads must be 0"),
    ],
)
def test_bad_input_is_a_one_line_error(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        bench_train.main(argv)
