"""Shard settings: patterns, lists, weights, and one clear error before training for every mistake."""

from __future__ import annotations

import logging
import os
from collections import Counter
from itertools import islice

import pytest
from omegaconf import OmegaConf

from clip_train.data import DataConfig, build_eval_loader, build_train_loader, resolve_sources


def test_brace_pattern_list_and_weighted_sources(make_shards):
    pattern, _ = make_shards([2, 2, 2])
    other, _ = make_shards([2], name="other")
    (source,) = resolve_sources(pattern)
    assert [u.rsplit("/", 1)[1] for u in source.urls] == ["00000.tar", "00001.tar", "00002.tar"]
    (both,) = resolve_sources([pattern, other])
    assert len(both.urls) == 4
    mixed = resolve_sources(OmegaConf.create([{"shards": pattern, "weight": 3}, {"shards": other}]))
    assert [len(s.urls) for s in mixed] == [3, 1] and [s.weight for s in mixed] == [3.0, 1.0]


def test_globs_folders_and_list_files(make_shards, tmp_path):
    pattern, _ = make_shards([2, 2])
    folder = pattern.rsplit("/", 1)[0]
    assert len(resolve_sources(folder + "/*.tar")[0].urls) == 2
    assert len(resolve_sources(folder)[0].urls) == 2
    listing = tmp_path / "shards" / "list.txt"
    listing.write_text("# two shards\n00000.tar\n00001.tar\n")
    assert resolve_sources(str(listing))[0].urls == (folder + "/00000.tar", folder + "/00001.tar")


def test_remote_urls_pass_through():
    (source,) = resolve_sources("pipe:aws s3 cp s3://bucket/{0..2}.tar -")
    assert source.urls == tuple(f"pipe:aws s3 cp s3://bucket/{i}.tar -" for i in range(3))


@pytest.mark.parametrize("bad", ["/nowhere/{00000..00009}.tar", "/nowhere/x.tar"])
def test_pattern_matching_nothing_fails_when_the_loader_is_built(bad):
    with pytest.raises(ValueError) as err:
        build_train_loader(DataConfig(train_shards=bad, num_workers=0), 16)
    message = str(err.value)
    assert "data.train_shards" in message and bad in message and "matched no files" in message
    assert "\n" not in message
    if "{" in bad:
        assert "quote" in message


def test_eval_pattern_matching_nothing_names_val_shards():
    with pytest.raises(ValueError, match="data.val_shards"):
        build_eval_loader(DataConfig(val_shards="/nowhere/{0..3}.tar", num_workers=0), 16)


def test_a_brace_pattern_hydra_read_as_a_dict_says_to_quote_it():
    with pytest.raises(ValueError, match="quote"):
        resolve_sources(OmegaConf.create({"00000..00009": None}))


def test_unbalanced_braces_and_unset_setting_are_clear():
    with pytest.raises(ValueError, match="unbalanced braces"):
        resolve_sources("/data/{00000..00009.tar")
    with pytest.raises(ValueError, match="is not set"):
        resolve_sources(None)


def test_missing_shards_are_dropped_with_a_warning(make_shards, caplog):
    pattern, _ = make_shards([2, 2])
    wider = pattern.replace("{00000..00001}", "{00000..00003}")
    with caplog.at_level(logging.WARNING, logger="clip_train.data"):
        (source,) = resolve_sources(wider)
    assert len(source.urls) == 2 and "2 of 4 shards do not exist" in caplog.text


def test_a_lone_shard_among_numbered_siblings_hints_at_shell_expansion(make_shards, caplog):
    pattern, _ = make_shards([2, 2, 2])
    with caplog.at_level(logging.WARNING, logger="clip_train.data"):
        resolve_sources(pattern.replace("{00000..00002}", "00002"))
    assert "quote" in caplog.text


def test_unreadable_shard_list_and_non_tar_files_fail_early(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="cannot read the shard list"):
        resolve_sources(str(listing))
    fake = tmp_path / "00000.tar"
    fake.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match="not a readable tar"):
        build_train_loader(DataConfig(train_shards=str(fake), num_workers=0), 16)


def test_weights_need_resampled_mode(make_shards):
    pattern, _ = make_shards([4, 4])
    cfg = DataConfig(train_shards=[{"shards": pattern, "weight": 2.0}], resampled=False, num_workers=0,
                     batch_size=2)
    with pytest.raises(ValueError, match="resampled"):
        build_train_loader(cfg, 16)


def test_weighted_sources_are_mixed_by_weight(make_shards, tokenizer, captions_of):
    heavy, _ = make_shards([2] * 5, name="heavy")
    light, light_captions = make_shards([2] * 5, name="light", first=1000)
    cfg = DataConfig(train_shards=[{"shards": heavy, "weight": 4.0}, {"shards": light, "weight": 1.0}],
                     num_workers=0, batch_size=10, shuffle_buffer=0, shuffle_shards=1)
    seen = [c for _, tokens in islice(iter(build_train_loader(cfg, 8, tokenizer)), 60) for c in captions_of(tokens)]
    share = sum(c not in set(light_captions) for c in seen) / len(seen)
    assert 0.7 < share < 0.9  # 4:1 weights -> 80% of the shards drawn come from the heavy source


def test_dict_and_omegaconf_configs_are_accepted(make_shards, tokenizer):
    pattern, _ = make_shards([4])
    for cfg in ({"train_shards": pattern, "num_workers": 0, "batch_size": 2},
                OmegaConf.structured(DataConfig(train_shards=pattern, num_workers=0, batch_size=2))):
        images, _ = next(iter(build_train_loader(cfg, 16, tokenizer)))
        assert images.shape[0] == 2
    with pytest.raises(ValueError, match="unknown data option"):
        build_train_loader({"train_shards": pattern, "batchsize": 2}, 16, tokenizer)


@pytest.fixture
def http_root():
    """A local HTTP server over a folder (webdataset fetches http URLs with curl)."""
    import functools
    import http.server
    import threading

    servers = []

    def serve(folder) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("scheme", ["pipe", "http"])
def test_pipe_and_http_shards_are_streamed_end_to_end(make_shards, tokenizer, captions_of, http_root, scheme):
    import shutil

    if scheme == "http" and shutil.which("curl") is None:
        pytest.skip("webdataset reads http(s) URLs with curl, which is not installed")
    pattern, captions = make_shards([6, 5, 7])
    folder = os.path.dirname(pattern)
    name = os.path.basename(pattern)
    url = f"pipe:cat {folder}/{name}" if scheme == "pipe" else f"{http_root(folder)}/{name}"
    manifest = f"{folder}/shards.json" if scheme == "pipe" else f"{http_root(folder)}/shards.json"
    cfg = DataConfig(train_shards=url, manifest=manifest, resampled=False, num_workers=2, batch_size=3)
    loader = build_train_loader(cfg, 16, tokenizer)
    seen = [c for _, tokens in loader for c in captions_of(tokens)]
    assert len(loader) == 6 and len(seen) == 18
    assert Counter(seen) == Counter(captions)  # every sample once, read through the command / the server
