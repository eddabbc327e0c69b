"""Evaluation follows the conventions of the tools users compare with (CLIP_benchmark's retrieval recall and
template files), and accepts its inputs the way training does (a folder of shards, class names by name)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_train
from clip_train.config import TrainConfig, ZeroShotSetConfig
from clip_train.data.transforms import normalize_on_device
from clip_train.data.writer import ManifestShardWriter
from clip_train.eval.__main__ import main as eval_main
from clip_train.eval.imagefolder import folder_class_indices
from clip_train.eval.retrieval import retrieval_recall
from clip_train.eval.templates import load_classnames, load_templates
from clip_train.train.distributed import DistributedContext
from clip_train.train.zeroshot_hook import ZeroShotHook
from tests.cli_helpers import write_perturbed_tiny_checkpoint


def clip_benchmark_recall(scores: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """CLIP_benchmark's recall@K, written from its definition: for each query row of ``scores`` take the K
    highest-scoring candidates; the query is a hit when at least one of its positives is among them.

    ``torch.topk`` leaves the order of tied scores unspecified, so the top K here come from a stable
    descending sort (tied candidates in index order): the ordering the convention needs to be well defined.
    """
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    hits = positive.gather(1, top).any(dim=1)
    return hits.double().mean().item()


def test_retrieval_recall_with_duplicate_captions_matches_clip_benchmarks_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    num_images, dim = 40, 6
    # Small integers: every dot product is exact, so ties are exact whichever way the matrix is computed.
    images = torch.randint(-2, 3, (num_images, dim), generator=generator).float()
    owner = torch.arange(num_images).repeat_interleave(3)  # three captions per image, COCO-style
    texts = torch.randint(-2, 3, (owner.numel(), dim), generator=generator).float()
    # Web-style duplicates: one generic caption ("a photo") shared by every fourth image, and a caption
    # that is a copy of another image's caption.
    texts[owner % 4 == 0] = torch.tensor([1.0, 1, 1, 1, 1, 1])
    texts[5] = texts[9]
    images[7] = images[3]  # and two identical images

    scores = images @ texts.T
    positive = owner[None, :] == torch.arange(num_images)[:, None]  # [images, texts]
    ks = (1, 2, 5, 10)
    ours = retrieval_recall(images, texts, owner, ks=ks, chunk=7)  # chunked, as for COCO's 25k captions
    for k in ks:
        assert ours[f"image_to_text_recall@{k}"] == clip_benchmark_recall(scores, positive, k), k
        assert ours[f"text_to_image_recall@{k}"] == clip_benchmark_recall(scores.T, positive.T, k), k

    # The duplicates are what the convention is about: counting ties as hits scores higher.
    generous_i2t_at_1 = sum(
        bool((scores[i, owner == i].max() >= scores[i, owner != i]).all()) for i in range(num_images)
    ) / num_images
    assert ours["image_to_text_recall@1"] < generous_i2t_at_1


def test_identical_captions_of_one_image_are_not_penalised() -> None:
    images = torch.eye(3)
    texts = torch.eye(3)[[0, 0, 1, 2]]  # image 0 has two identical captions
    owner = torch.tensor([0, 0, 1, 2])
    result = retrieval_recall(images, texts, owner, ks=(1,))
    assert result["image_to_text_recall@1"] == 1.0
    assert result["text_to_image_recall@1"] == 1.0


# ------------------------------------------------------------------ templates, shard folders, class names

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]  # counting order
TEMPLATES = ["a photo of the number {}.", "the digit {}"]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _digit_image(rng: np.random.Generator, index: int) -> np.ndarray:
    """32x32 (the tiny model's size, so no resampling); each class its own brightness pattern."""
    pixels = rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
    pixels[:, : 3 * (index + 1)] += 200
    return pixels


@pytest.fixture(scope="module")
def model_and_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    return write_perturbed_tiny_checkpoint(run), run


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """Folders zero/ ... nine/ with index+1 images each (so a class's sample count tells which folder it got)."""
    root = tmp_path_factory.mktemp("digits")
    rng = np.random.default_rng(0)
    images: dict[str, list[np.ndarray]] = {}
    for index, name in enumerate(DIGITS):
        (root / "images" / name).mkdir(parents=True)
        images[name] = [_digit_image(rng, index) for _ in range(index + 1)]
        for i, pixels in enumerate(images[name]):
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
    (root / "natural.txt").write_text("\n".join(DIGITS) + "\n")
    (root / "sorted.txt").write_text("\n".join(sorted(DIGITS)) + "\n")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root, images


def _eval(argv: list[str], capsys) -> dict:
    assert eval_main([*argv, "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _error(argv: list[str], capsys) -> str:
    assert eval_main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _direct_top1(model, images: dict[str, list[np.ndarray]], classnames: list[str], templates: list[str]) -> float:
    """Top-1 computed here: the class heads in the file's order, each image labelled by its folder's name."""
    tokenizer = clip_train.get_tokenizer("tiny")
    with torch.no_grad():
        heads = torch.stack([
            F.normalize(F.normalize(model.encode_text(tokenizer([t.format(c) for t in templates])), dim=-1).mean(0),
                        dim=0)
            for c in classnames], dim=1)
        arrays = [a for name in images for a in images[name]]
        target = torch.tensor([classnames.index(name) for name in images for _ in images[name]])
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        features = F.normalize(model.encode_image(normalize_on_device(batch)), dim=-1)
    return ((features @ heads).argmax(dim=1) == target).double().mean().item()


def test_templates_take_clip_benchmarks_c_slot_as_well_as_braces(tmp_path: Path) -> None:
    braces = tmp_path / "braces.txt"
    braces.write_text("a photo of a {}.\nitap of the {}.\n")
    clip_benchmark_style = tmp_path / "c.txt"
    clip_benchmark_style.write_text("a photo of a {c}.\nitap of the {c}.\n")
    as_json = tmp_path / "templates.json"
    as_json.write_text(json.dumps({"templates": ["a photo of a {c}.", "itap of the {}."]}))
    expected = ["a photo of a {}.", "itap of the {}."]
    assert load_templates(str(braces)) == load_templates(str(clip_benchmark_style)) == expected
    assert load_templates(str(as_json)) == expected
    assert [t.format("cat") for t in load_templates(str(clip_benchmark_style))] == [
        "a photo of a cat.", "itap of the cat."]

    no_slot = tmp_path / "bad.txt"
    no_slot.write_text("a photo of a {c}.\na photo\n")
    with pytest.raises(ValueError, match=r"\{c\}.*'a photo' does not"):
        load_templates(str(no_slot))


def test_zeroshot_with_c_templates_equals_brace_templates(model_and_run, digit_folder, tmp_path, capsys) -> None:
    _, run = model_and_run
    root, _ = digit_folder
    c_file = tmp_path / "c.txt"
    c_file.write_text("\n".join(t.replace("{}", "{c}") for t in TEMPLATES) + "\n")
    common = ["zeroshot", "--checkpoint", str(run), "--data", str(root / "images"), "--classnames",
              str(root / "natural.txt")]
    braces = _eval([*common, "--templates", str(root / "templates.txt")], capsys)
    c_slot = _eval([*common, "--templates", str(c_file)], capsys)
    assert c_slot["top1"] == braces["top1"] and c_slot["per_class_top1"] == braces["per_class_top1"]


def test_zeroshot_on_a_folder_of_shards_reads_them_as_shards(model_and_run, tmp_path, capsys) -> None:
    _, run = model_and_run
    rng = np.random.default_rng(1)
    with ManifestShardWriter(str(tmp_path / "shards"), samples_per_shard=7) as writer:
        for i in range(20):
            writer.write({"__key__": f"{i:04d}", "png": _png(_digit_image(rng, i % 10)), "cls": str(i % 10)})
    names = tmp_path / "names.txt"
    names.write_text("\n".join(DIGITS) + "\n")
    common = ["zeroshot", "--checkpoint", str(run), "--classnames", str(names), "--templates", "simple"]
    from_folder = _eval([*common, "--data", str(tmp_path / "shards")], capsys)
    from_pattern = _eval([*common, "--data", writer.pattern], capsys)
    assert from_folder["samples"] == from_pattern["samples"] == 20
    for key in ("top1", "top5", "per_class_top1"):
        assert from_folder[key] == from_pattern[key], key


def test_imagefolder_classes_are_matched_to_the_class_names_by_name(model_and_run, digit_folder, capsys) -> None:
    model, run = model_and_run
    root, images = digit_folder
    common = ["zeroshot", "--checkpoint", str(run), "--data", str(root / "images"), "--templates",
              str(root / "templates.txt")]
    natural = _eval([*common, "--classnames", str(root / "natural.txt")], capsys)
    in_sorted_order = _eval([*common, "--classnames", str(root / "sorted.txt")], capsys)
    assert natural["top1"] == pytest.approx(in_sorted_order["top1"])
    assert natural["per_class_top1"] == pytest.approx(in_sorted_order["per_class_top1"])
    # Each name got its own folder's images (class k has k + 1), and the numbers are the direct computation's.
    assert natural["per_class_samples"] == {name: index + 1 for index, name in enumerate(DIGITS)}
    assert natural["top1"] == pytest.approx(_direct_top1(model, images, DIGITS, TEMPLATES))


def test_folders_and_class_names_that_differ_are_refused_in_one_line(digit_folder, model_and_run, tmp_path,
                                                                     capsys) -> None:
    _, run = model_and_run
    root, _ = digit_folder
    common = ["zeroshot", "--checkpoint", str(run), "--data", str(root / "images")]
    nine = tmp_path / "nine.txt"
    nine.write_text("\n".join(DIGITS[:9]) + "\n")
    err = _error([*common, "--classnames", str(nine)], capsys)
    assert "10 class folders" in err and "9 names" in err and "eight" in err and "zero" in err
    renamed = tmp_path / "renamed.txt"
    renamed.write_text("\n".join([*DIGITS[:9], "9"]) + "\n")
    err = _error([*common, "--classnames", str(renamed)], capsys)
    assert "folders nine are not among the names" in err and "names 9 match no folder" in err

    # Folders that share no name with the file pair by sorted position (ImageNet's WordNet-id folders).
    indices = folder_class_indices("root", ["n02", "n01"], ["goldfish", "tench"])
    assert indices == [0, 1]
    assert folder_class_indices("root", ["golden_retriever", "Tabby"], ["tabby", "golden retriever"]) == [1, 0]


def test_builtin_imagenet_names_and_imagenet_v2s_numbered_folders(model_and_run, tmp_path, capsys) -> None:
    open_clip_metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    assert load_classnames("imagenet") == list(open_clip_metadata.IMAGENET_CLASSNAMES)  # OpenAI's 1,000 names
    # ImageNet-V2's folders are 0..999: folder "10" holds class 10, not the third name in text order.
    folders = sorted(str(i) for i in range(1000))
    assert folders[2] == "10" and folder_class_indices("root", folders, load_classnames("imagenet"))[2] == 10

    _, run = model_and_run
    names = [f"class {k}" for k in range(12)]
    rng = np.random.default_rng(0)
    for k in range(12):  # folder k holds k + 1 images, so each class's sample count shows its folder
        (tmp_path / "v2" / str(k)).mkdir(parents=True)
        for i in range(k + 1):
            Image.fromarray(_digit_image(rng, k % 10)).save(tmp_path / "v2" / str(k) / f"{i}.png")
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    result = _eval(["zeroshot", "--checkpoint", str(run), "--data", str(tmp_path / "v2"), "--classnames",
                    str(tmp_path / "names.txt"), "--templates", "simple"], capsys)
    assert result["per_class_samples"] == {name: k + 1 for k, name in enumerate(names)}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # 50 iterations: labels, not fit, matter
def test_linear_probe_labels_follow_the_class_names_by_name(digit_folder, model_and_run, tmp_path, capsys) -> None:
    _, run = model_and_run
    root, _ = digit_folder
    common = ["linear-probe", "--checkpoint", str(run), "--train-data", str(root / "images"), "--test-data",
              str(root / "images"), "--max-iter", "50"]
    result = _eval([*common, "--classnames", str(root / "natural.txt")], capsys)
    assert result["per_class_samples"] == {name: index + 1 for index, name in enumerate(DIGITS)}
    nine = tmp_path / "nine.txt"
    nine.write_text("\n".join(DIGITS[:9]) + "\n")
    assert "10 class folders" in _error([*common, "--classnames", str(nine)], capsys)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_a_linear_probe_test_folder_with_some_of_the_classes_is_labelled_by_name(digit_folder, model_and_run,
                                                                                 tmp_path, capsys) -> None:
    # Without --classnames the training folders name the classes: a test set holding only "seven" and
    # "three" must not become classes 0 and 1 (eight and five, in sorted order).
    import shutil

    _, run = model_and_run
    root, _ = digit_folder
    for name in ("seven", "three"):
        shutil.copytree(root / "images" / name, tmp_path / "test" / name)
    common = ["linear-probe", "--checkpoint", str(run), "--train-data", str(root / "images"), "--max-iter", "50"]
    result = _eval([*common, "--test-data", str(tmp_path / "test")], capsys)
    assert result["per_class_samples"] == {name: {"seven": 8, "three": 4}.get(name, 0) for name in sorted(DIGITS)}
    assert result["per_class_top1"]["eight"] is None and result["test_samples"] == 12
    (tmp_path / "test" / "ten").mkdir()
    shutil.copy(root / "images" / "one" / "0.png", tmp_path / "test" / "ten" / "0.png")
    err = _error([*common, "--test-data", str(tmp_path / "test")], capsys)
    assert "class folders ten are not among the 10 classes of --train-data" in err


def test_training_hook_matches_folders_by_name_and_refuses_a_mismatch_at_start_up(
    digit_folder, model_and_run, tmp_path, capsys
) -> None:
    model, run = model_and_run
    root, _ = digit_folder
    cli = _eval(["zeroshot", "--checkpoint", str(run), "--data", str(root / "images"), "--classnames",
                 str(root / "natural.txt"), "--templates", str(root / "templates.txt")], capsys)
    context = DistributedContext(0, 0, 1, torch.device("cpu"))
    cfg = TrainConfig()
    cfg.eval.zeroshot = [ZeroShotSetConfig(name="digits", data=str(root / "images"),
                                           classnames=str(root / "natural.txt"),
                                           templates=str(root / "templates.txt"), batch_size=8)]
    hook = ZeroShotHook(cfg, clip_train.get_tokenizer("tiny"), context)
    assert hook.run(model, torch.device("cpu"))["zeroshot_digits_top1"] == pytest.approx(cli["top1"])

    nine = tmp_path / "nine.txt"
    nine.write_text("\n".join(DIGITS[:9]) + "\n")
    cfg.eval.zeroshot[0].classnames = str(nine)
    with pytest.raises(ValueError, match=r"10 class folders.*eval\.zeroshot\[digits\]\.classnames.*9 names"):
        ZeroShotHook(cfg, clip_train.get_tokenizer("tiny"), context)
