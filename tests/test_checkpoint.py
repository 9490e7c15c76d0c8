"""Adapter checkpoints: bit-exact round trip, refusals that name the tensor, the manifest, frozen projections."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_spec, make_inputs, randomise_, retrieval_forward, spec_dict
from unitrans.engine.checkpoint import load_adapter, save_adapter
from unitrans.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def quickstart_like(rank=8, train_projections=True):
    return spec_dict(
        [{"name": "vcra.v1", "targets": ["vision.attn.*", "text.attn.*", "fusion.attn.*"], "rank": rank,
          "train_projections": train_projections}],
        {"name": "qasn.v1"},
        {"train_parts": ["itm_head"]},
    )


def _randomised(d, seed):
    spec, built = build_spec(d)
    randomise_(built.trainable_state().values(), seed=seed, std=0.3)
    return spec, built


def test_round_trip_is_bit_exact(tmp_path):
    spec, saved = _randomised(quickstart_like(), seed=1)
    before = {k: v.detach().clone() for k, v in saved.trainable_state().items()}
    manifest = save_adapter(saved, spec, tmp_path)
    assert (tmp_path / "adapter.safetensors").is_file() and manifest["numel"] == sum(v.numel() for v in before.values())

    _, loaded = build_spec(quickstart_like())  # the same base (another one is refused: see below)
    fresh = loaded.trainable_state()
    assert set(fresh) == set(before)
    assert any(not torch.equal(fresh[k], before[k]) for k in before)
    load_adapter(loaded, tmp_path)
    after = loaded.trainable_state()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    # the shared pair stays one tensor after loading: QASN still reads the adapter's (now loaded) pair
    vcra, side = loaded.adapters[0], loaded.side_network
    assert side._pair[0] is vcra.pair("shared")[0]
    assert torch.equal(side._pair[0], before["adapters.0.A.shared"])


def _assert_same_outputs(saved, loaded, folder) -> None:
    """Loads the adapter in ``folder`` into ``loaded``; both models then give bit-identical retrieval outputs."""
    load_adapter(loaded, folder)
    pixel, tok = make_inputs(saved.backbone, batch=2)
    with torch.no_grad():
        a = retrieval_forward(saved.backbone, pixel, tok)
        b = retrieval_forward(loaded.backbone, pixel, tok)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trip_reproduces_the_outputs(tmp_path):
    spec, saved = _randomised(quickstart_like(), seed=2)
    save_adapter(saved, spec, tmp_path)
    _, loaded = build_spec(quickstart_like())  # same seed: same frozen weights
    _assert_same_outputs(saved, loaded, tmp_path)


def test_checkpoint_of_another_rank_is_refused_naming_the_tensor(tmp_path):
    spec, saved = _randomised(quickstart_like(rank=8), seed=3)
    save_adapter(saved, spec, tmp_path)
    _, other = build_spec(quickstart_like(rank=4))
    with pytest.raises(UserError) as err:
        load_adapter(other, tmp_path)
    msg = str(err.value)
    assert "'adapters.0.A.shared'" in msg and "(4," in msg and "(8," in msg


def test_missing_and_extra_tensors_are_named(tmp_path):
    spec, saved = _randomised(quickstart_like(), seed=4)
    save_adapter(saved, spec, tmp_path)
    path = tmp_path / "adapter.safetensors"
    state = load_file(str(path))
    missing = "side_network.beta.1"
    del state[missing]
    save_file(state, str(path))
    _, target = build_spec(quickstart_like())
    with pytest.raises(UserError, match=f"'{missing}'.*lacks it"):
        load_adapter(target, tmp_path)

    state = load_file(str(path))
    state[missing] = torch.zeros(64)
    state["adapters.0.lambda_a.bogus"] = torch.zeros(8)
    save_file(state, str(path))
    with pytest.raises(UserError, match="'adapters.0.lambda_a.bogus' is not in the built model"):
        load_adapter(target, tmp_path)
    with pytest.raises(UserError, match="no adapter checkpoint"):
        load_adapter(target, tmp_path / "nowhere")


def test_manifest_lists_names_and_shapes(tmp_path):
    spec, saved = _randomised(quickstart_like(), seed=5)
    save_adapter(saved, spec, tmp_path)
    manifest = json.loads((tmp_path / "adapter.json").read_text())
    on_disk = load_file(str(tmp_path / "adapter.safetensors"))
    assert manifest["format"] == "unitrans.adapter.v1"
    assert manifest["tensors"] == {k: list(v.shape) for k, v in on_disk.items()}
    assert manifest["tensors"]["adapters.0.A.shared"] == [8, 64]
    assert manifest["tensors"]["adapters.0.B.shared"] == [64, 8]
    assert manifest["tensors"]["backbone.itm_head.weight"] == [2, 64]
    assert manifest["numel"] == sum(v.numel() for v in on_disk.values())
    assert manifest["components"]["side_network"].startswith("qasn")


def test_frozen_projections_are_not_saved(tmp_path):
    spec, saved = _randomised(quickstart_like(train_projections=False), seed=6)
    save_adapter(saved, spec, tmp_path)
    on_disk = load_file(str(tmp_path / "adapter.safetensors"))
    assert not any(k.startswith(("adapters.0.A.", "adapters.0.B.")) for k in on_disk)
    assert any(k.startswith("adapters.0.lambda_b.") for k in on_disk)
    manifest = json.loads((tmp_path / "adapter.json").read_text())
    assert set(manifest["tensors"]) == set(on_disk)
    # the projections are regenerated from the seed: a reload reproduces the outputs exactly
    _, loaded = build_spec(quickstart_like(train_projections=False))
    _assert_same_outputs(saved, loaded, tmp_path)


def test_another_base_is_refused(tmp_path):
    """adapter.json records the base's identity: another seed of the random-init preset, or the same base with an
    adapter already merged into it (a merged export), is refused by name; the base it was trained on loads."""
    spec, saved = _randomised(quickstart_like(), seed=7)
    manifest = save_adapter(saved, spec, tmp_path)
    assert manifest["base"]["identity"].startswith("sha256:") and manifest["base"]["seed"] == 0

    _, other_seed = build_spec(quickstart_like(), seed=1)
    with pytest.raises(UserError, match="the adapter was trained on base sha256:.*but this spec builds base"):
        load_adapter(other_seed, tmp_path)

    _, merged = _randomised(quickstart_like(), seed=8)
    merged.adapters[0].merge()  # the frozen weights at the injection points now hold an update
    with pytest.raises(UserError, match=str(tmp_path / "adapter.json")):
        load_adapter(merged, tmp_path)
    merged.adapters[0].unmerge()  # bit-exact: the original base again
    load_adapter(merged, tmp_path)
    assert torch.equal(merged.trainable_state()["adapters.0.A.shared"], saved.trainable_state()["adapters.0.A.shared"])


@pytest.mark.parametrize("name", ["adapter.safetensors", "adapter.json"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_adapter_file_is_one_line_naming_it(tmp_path, name, damage):
    spec, saved = _randomised(quickstart_like(), seed=9)
    save_adapter(saved, spec, tmp_path)
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:41] if damage == "truncate" else b"\x89garbage\x00" * 5)
    _, target = build_spec(quickstart_like())
    with pytest.raises(UserError) as err:
        load_adapter(target, tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
