"""``python -m clip_train.eval``: zero-shot, retrieval and linear probe on tiny sets the tests write.

The CLI's numbers are checked against features computed here directly from the model (images are written
at the model's 32 px, so no resampling stands between the two), and against hand-made known answers.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_train
from clip_train.config import RetrievalSetConfig, TrainConfig, ZeroShotSetConfig
from clip_train.data.transforms import normalize_on_device
from clip_train.data.writer import ManifestShardWriter
from clip_train.eval.__main__ import main as eval_main
from clip_train.eval.linear_probe import linear_probe, stratified_split
from clip_train.eval.retrieval import retrieval_recall
from clip_train.train.distributed import DistributedContext, shutdown
from clip_train.train.zeroshot_hook import ZeroShotHook
from tests.cli_helpers import write_perturbed_tiny_checkpoint

CLASSES = ["blue", "green", "red"]  # sorted, as ImageFolder numbers its folders
TEMPLATES = ["a photo of {}.", "something {}"]


def _image(rng: np.random.Generator, channel: int) -> np.ndarray:
    """A 32x32 image dominated by one colour channel, with noise so no two images are alike."""
    pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
    pixels[..., channel] += 180
    return pixels


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    return write_perturbed_tiny_checkpoint(run), run


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageFolder: red/green/blue, 6 images each; returns (root, class names file, templates file, arrays)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    arrays = {}
    for index, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        for i in range(6):
            pixels = _image(rng, index)
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
            arrays[(name, i)] = pixels
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root / "images", root / "classes.txt", root / "templates.txt", arrays


def _run(argv, capsys) -> dict:
    assert eval_main(argv) == 0
    out = capsys.readouterr()
    return json.loads(out.out.strip().splitlines()[-1])


def _encode_images(model, arrays: list[np.ndarray]) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return F.normalize(model.encode_image(normalize_on_device(batch)), dim=-1)


def _encode_texts(model, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_text(clip_train.get_tokenizer("tiny")(texts)), dim=-1)


def test_zeroshot_cli_on_imagefolder_matches_direct_computation(model_and_checkpoint, folder, capsys, tmp_path):
    model, run = model_and_checkpoint
    images, classes, templates, arrays = folder
    out_file = tmp_path / "result.json"
    result = _run(["zeroshot", "--checkpoint", str(run), "--data", str(images), "--classnames", str(classes),
                   "--templates", str(templates), "--batch-size", "5", "--output", str(out_file)], capsys)
    assert json.loads(out_file.read_text())["top1"] == result["top1"]

    # The same classification, written out by hand.
    heads = torch.stack([F.normalize(_encode_texts(model, [t.format(c) for t in TEMPLATES]).mean(0), dim=0)
                         for c in CLASSES], dim=1)
    labels = torch.tensor([i for i, _ in enumerate(CLASSES) for _ in range(6)])
    features = _encode_images(model, [arrays[(c, i)] for c in CLASSES for i in range(6)])
    predicted = (features @ heads).argmax(dim=1)
    assert result["samples"] == 18 and result["classes"] == 3 and result["templates"] == 2
    assert result["top1"] == pytest.approx((predicted == labels).double().mean().item())
    assert result["top5"] == 1.0  # three classes: the right one is always in the top 5
    for index, name in enumerate(CLASSES):
        expected = (predicted[labels == index] == index).double().mean().item()
        assert result["per_class_top1"][name] == pytest.approx(expected)
        assert result["per_class_samples"][name] == 6


def test_training_hook_gives_the_cli_numbers(model_and_checkpoint, folder, capsys):
    model, run = model_and_checkpoint
    images, classes, templates, _ = folder
    cli = _run(["zeroshot", "--checkpoint", str(run), "--data", str(images), "--classnames", str(classes),
                "--templates", str(templates), "--no-progress"], capsys)
    cfg = TrainConfig()
    cfg.eval.zeroshot = [ZeroShotSetConfig(name="colours", data=str(images), classnames=str(classes),
                                           templates=str(templates), batch_size=4)]
    hook = ZeroShotHook(cfg, clip_train.get_tokenizer("tiny"), DistributedContext(0, 0, 1, torch.device("cpu")))
    hooked = hook.run(model, torch.device("cpu"))
    assert hooked["zeroshot_colours_top1"] == pytest.approx(cli["top1"])
    assert hooked["zeroshot_colours_top5"] == pytest.approx(cli["top5"])


def test_zeroshot_cli_progress_bar_and_one_line_errors(model_and_checkpoint, folder, tmp_path, capsys):
    _, run = model_and_checkpoint
    images, classes, templates, _ = folder
    assert eval_main(["zeroshot", "--checkpoint", str(run), "--data", str(images), "--classnames", str(classes),
                      "--templates", str(templates)]) == 0
    assert "zero-shot" in capsys.readouterr().err  # tqdm on stderr, so stdout stays JSON

    two = tmp_path / "two.txt"
    two.write_text("blue\ngreen\n")
    bad_inputs = [
        (["--checkpoint", str(run), "--data", str(images), "--classnames", str(two)], "3 class folders"),
        (["--checkpoint", str(tmp_path / "nothing"), "--data", str(images), "--classnames", str(classes)],
         "not found"),
        (["--checkpoint", str(run), "--data", str(tmp_path / "missing")], "--data"),
        (["--checkpoint", str(run), "--data", str(images), "--classnames", str(classes), "--templates", "fancy"],
         "fancy"),
    ]
    for argv, expected in bad_inputs:
        assert eval_main(["zeroshot", *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


def test_retrieval_recall_known_answers():
    e = torch.eye(4)
    images = e[:3]  # image i points along axis i
    texts = F.normalize(torch.stack([
        e[0],                    # caption 0 of image 0: exact
        e[3] + 0.1 * e[0],       # caption 1 of image 0: weak but still nearest image 0
        e[2] + 0.1 * e[1],       # caption of image 1 that looks like image 2: text->image rank 1
        e[2],                    # caption of image 2: exact
    ]), dim=-1)
    owner = torch.tensor([0, 0, 1, 2])
    r = retrieval_recall(images, texts, owner, ks=(1, 2))
    # image->text: image 0's best own caption is exact, and its weak second caption does not count against
    # it; image 1's caption scores 0.0995 and no other caption scores above that; image 2's is exact.
    assert r["image_to_text_recall@1"] == 1.0
    # text->image: captions 0, 1, 3 find their image first; caption 2 finds image 2 first, its own second.
    assert r["text_to_image_recall@1"] == pytest.approx(3 / 4)
    assert r["text_to_image_recall@2"] == 1.0
    # Swap the owners of captions 2 and 3: image 1 now owns e2 (scores 0; caption 2 scores 0.0995 above it)
    # and image 2 owns e2+0.1e1 (0.995; caption 3 scores 1.0 above it): only image 0 still ranks first.
    # Image 1's caption ties at 0 with captions 0 and 1, which come first in the stable order (ties are
    # not hits): it is 4th, so a hit at 4 but not at 2.
    swapped = retrieval_recall(images, texts, torch.tensor([0, 0, 2, 1]), ks=(1, 2, 4))
    assert swapped["image_to_text_recall@1"] == pytest.approx(1 / 3)
    assert swapped["image_to_text_recall@2"] == pytest.approx(2 / 3)
    assert swapped["image_to_text_recall@4"] == 1.0
    with pytest.raises(ValueError, match="outside the images"):
        retrieval_recall(images, texts, torch.tensor([0, 0, 1, 3]))


def _write_captioned_shards(root, model) -> tuple[str, list[np.ndarray], list[list[str]]]:
    """Two shards of 32 px images with 1-3 captions each (lines or a JSON list)."""
    rng = np.random.default_rng(1)
    arrays, captions = [], []
    words = ["cat", "dog", "car", "tree", "boat", "house", "bird"]
    with ManifestShardWriter(str(root), samples_per_shard=4) as writer:
        for i in range(7):
            pixels = _image(rng, i % 3)
            caps = [f"a photo of a {words[i]}", f"a {words[(i + 1) % 7]} and a {words[i]}", f"{words[i]}"][: 1 + i % 3]
            text = json.dumps(caps) if i == 2 else "\n".join(caps)
            writer.write({"__key__": f"{i:04d}", "png": _png(pixels), "txt": text})
            arrays.append(pixels)
            captions.append(caps)
    return writer.pattern, arrays, captions


def test_retrieval_cli_on_shards_with_several_captions(model_and_checkpoint, tmp_path, capsys):
    model, run = model_and_checkpoint
    pattern, arrays, captions = _write_captioned_shards(tmp_path / "shards", model)
    result = _run(["retrieval", "--checkpoint", str(run), "--data", pattern, "--batch-size", "3",
                   "--num-workers", "2", "--k", "1", "5", "--no-progress"], capsys)
    assert result["images"] == 7 and result["texts"] == sum(len(c) for c in captions) == 13
    # The training loop's hook, on the same shards, logs the same numbers.
    cfg = TrainConfig()
    cfg.data.num_workers = 0
    cfg.eval.retrieval = [RetrievalSetConfig(name="caps", data=pattern, batch_size=4)]
    hook = ZeroShotHook(cfg, clip_train.get_tokenizer("tiny"), DistributedContext(0, 0, 1, torch.device("cpu")))
    assert hook.enabled
    hooked = hook.run(model, torch.device("cpu"))
    assert hooked["retrieval_caps_text_to_image_recall@5"] == pytest.approx(result["text_to_image_recall@5"])
    assert hooked["retrieval_caps_image_to_text_recall@1"] == pytest.approx(result["image_to_text_recall@1"])

    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    expected = retrieval_recall(_encode_images(model, arrays), _encode_texts(model, [c for cs in captions for c in cs]),
                                owner, ks=(1, 5))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_linear_probe_pure_function_separable():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    labels = np.repeat(np.arange(3), 20)
    features = centres[labels] + rng.normal(size=(60, 8))
    train, test = stratified_split(labels, 0.25, seed=0)
    assert sorted(np.bincount(labels[test]).tolist()) == [5, 5, 5]
    result = linear_probe(features[train], labels[train], features[test], labels[test], c_grid=(0.1, 1.0))
    assert result["top1"] == 1.0 and result["test_samples"] == 15 and result["C"] in (0.1, 1.0)
    shuffled = rng.permutation(labels[train])  # nothing to learn: near chance
    assert linear_probe(features[train], shuffled, features[test], labels[test], c_grid=(1.0,))["top1"] < 0.8


def test_linear_probe_cli_separates_colours(model_and_checkpoint, folder, capsys):
    _, run = model_and_checkpoint
    images, classes, _, _ = folder
    result = _run(["linear-probe", "--checkpoint", str(run), "--train-data", str(images), "--test-fraction", "0.5",
                   "--classnames", str(classes), "--no-progress"], capsys)
    # Red, green and blue images are far apart even in a random network's features.
    assert result["top1"] == 1.0
    assert result["train_samples"] == 9 and result["test_samples"] == 9
    assert set(result["per_class_top1"]) == set(CLASSES)
    assert eval_main(["linear-probe", "--checkpoint", str(run), "--train-data", str(images), "--no-progress"]) == 2
    assert "--test-fraction" in capsys.readouterr().err


def _hook_in_rank(rank, init_file, cfg, model, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ctx = DistributedContext(rank, rank, 2, torch.device("cpu"))
        hook = ZeroShotHook(cfg, clip_train.get_tokenizer("tiny"), ctx)
        queue.put((rank, hook.run(model, torch.device("cpu"))))
    finally:
        shutdown()  # as the trainer leaves: Queue.put's feeder thread must still get the GIL (see shutdown)


def test_hook_over_two_gloo_ranks_equals_one_process(model_and_checkpoint, folder, tmp_path):
    """Each rank scores its share; all_reduce (zero-shot) and all_gather (retrieval) give one process's numbers."""
    import multiprocessing

    model, _ = model_and_checkpoint
    images, classes, templates, _ = folder
    pattern, _, _ = _write_captioned_shards(tmp_path / "shards", model)
    cfg = TrainConfig()
    cfg.data.num_workers = 0
    cfg.eval.zeroshot = [ZeroShotSetConfig(data=str(images), classnames=str(classes), templates=str(templates),
                                           batch_size=4)]
    cfg.eval.retrieval = [RetrievalSetConfig(data=pattern, batch_size=3)]
    single = ZeroShotHook(cfg, clip_train.get_tokenizer("tiny"), DistributedContext(0, 0, 1, torch.device("cpu")))
    expected = single.run(model, torch.device("cpu"))

    mp = multiprocessing.get_context("fork")
    queue = mp.Queue()
    procs = [mp.Process(target=_hook_in_rank, args=(r, tmp_path / "pg", cfg, model, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        assert results[rank].keys() == expected.keys()
        for key, value in expected.items():
            assert results[rank][key] == pytest.approx(value, abs=1e-6), (rank, key)


@pytest.mark.parametrize("name, reference, count", [("openai", "OPENAI_IMAGENET_TEMPLATES", 80),
                                                    ("simple", "SIMPLE_IMAGENET_TEMPLATES", 7)])
def test_builtin_templates_are_openais_prompt_sets(name, reference, count):
    from open_clip import zero_shot_metadata

    from clip_train.eval.templates import load_templates

    ours = load_templates(name)
    assert len(ours) == count
    assert [t.format("goldfish") for t in ours] == [t("goldfish") for t in getattr(zero_shot_metadata, reference)]


SHARD_CLASSES = ["cat", "dog", "car", "tree", "boat", "house", "bird"]  # 7 > 5: top-5 can miss


def _labelled_shards(root) -> tuple[str, list[np.ndarray], list[int]]:
    """Three shards of 32 px images with an integer class in ``cls`` (4 per class, 28 in all)."""
    rng = np.random.default_rng(2)
    arrays, labels = [], []
    with ManifestShardWriter(str(root), samples_per_shard=10) as writer:
        for i in range(4 * len(SHARD_CLASSES)):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            label = i % len(SHARD_CLASSES)
            writer.write({"__key__": f"{i:04d}", "png": _png(pixels), "cls": str(label)})
            arrays.append(pixels)
            labels.append(label)
    return writer.pattern, arrays, labels


def _expected_zeroshot(model, arrays, labels, templates) -> dict:
    heads = torch.stack([F.normalize(_encode_texts(model, [t.format(c) for t in templates]).mean(0), dim=0)
                         for c in SHARD_CLASSES], dim=1)
    logits = _encode_images(model, arrays) @ heads
    target = torch.tensor(labels)
    top1 = logits.argmax(dim=1) == target
    top5 = (logits.topk(5, dim=1).indices == target[:, None]).any(dim=1)
    per_class = {c: top1[target == i].double().mean().item() for i, c in enumerate(SHARD_CLASSES)}
    return {"top1": top1.double().mean().item(), "top5": top5.double().mean().item(),
            "mean_per_class_top1": sum(per_class.values()) / len(per_class), "per_class_top1": per_class}


def test_zeroshot_cli_on_shards_with_a_class_field_and_builtin_templates(model_and_checkpoint, tmp_path, capsys):
    from clip_train.eval.templates import load_templates

    model, run = model_and_checkpoint
    pattern, arrays, labels = _labelled_shards(tmp_path / "shards")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(SHARD_CLASSES) + "\n")
    result = _run(["zeroshot", "--checkpoint", str(run), "--data", pattern, "--classnames", str(names),
                   "--templates", "simple", "--batch-size", "8", "--no-progress"], capsys)
    expected = _expected_zeroshot(model, arrays, labels, load_templates("simple"))
    assert result["samples"] == 28 and result["classes"] == 7 and result["templates"] == 7
    for key in ("top1", "top5", "mean_per_class_top1"):
        assert result[key] == pytest.approx(expected[key]), key
    assert result["top5"] < 1.0 or expected["top5"] == 1.0
    for name in SHARD_CLASSES:
        assert result["per_class_top1"][name] == pytest.approx(expected["per_class_top1"][name])
    # Shards carry no class names: without --classnames the CLI says so in one line.
    assert eval_main(["zeroshot", "--checkpoint", str(run), "--data", pattern, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--classnames" in err


def test_zeroshot_and_retrieval_under_torchrun_equal_one_process(model_and_checkpoint, tmp_path, capsys):
    import sys

    from tests.cli_helpers import cli_env, run_to_completion

    model, run = model_and_checkpoint
    labelled, _, _ = _labelled_shards(tmp_path / "labelled")
    captioned, _, _ = _write_captioned_shards(tmp_path / "captioned", model)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(SHARD_CLASSES) + "\n")
    tasks = {
        "zeroshot": ["zeroshot", "--checkpoint", str(run), "--data", labelled, "--classnames", str(names),
                     "--templates", "simple", "--batch-size", "4", "--num-workers", "0"],
        "retrieval": ["retrieval", "--checkpoint", str(run), "--data", captioned, "--batch-size", "2",
                      "--num-workers", "0"],
    }
    env = cli_env(tmp_path / "cache")  # one thread per rank, no inherited rank variables
    for task, argv in tasks.items():
        single = _run([*argv, "--no-progress"], capsys)
        done = run_to_completion([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node=2", "-m", "clip_train.eval", *argv, "--no-progress"],
                                 timeout=300, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        json_lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        assert len(json_lines) == 1, done.stdout  # rank 0 alone prints the combined result
        both = json.loads(json_lines[0])
        assert both["world_size"] == 2
        metrics = [k for k in single if k.startswith(("top", "mean_per_class", "image_to_text", "text_to_image"))]
        assert metrics, single
        for key in [*metrics, "samples", "images", "texts"]:
            if key in single:
                assert both[key] == pytest.approx(single[key], abs=1e-6), (task, key)
