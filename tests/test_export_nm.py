"""Exports of zoo plain modules (format "zoo": reload without model=) and the N:M packed format (sparse_format nm)."""

import json

import pytest
import torch

import compressx
from compressx.errors import ExportError
from compressx.export import load_sparse_state_dict
from compressx.recipe import parse_recipe
from compressx.zoo.resnet_digits import ResNetDigits, build_empty


def nm_weight(shape, n, m, seed):
    """A random weight that keeps the n largest of every m consecutive inputs (OHWI order for convs)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator)
    flat = weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight
    blocks = flat.reshape(-1, m)
    keep = blocks.abs().topk(n, dim=1).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, keep, True)
    pruned = torch.where(mask, blocks, torch.zeros(()))
    pruned = pruned.reshape(flat.shape)
    return pruned.permute(0, 3, 1, 2).contiguous() if weight.dim() == 4 else pruned


def sparse_resnet(dtype=torch.float32):
    torch.manual_seed(0)
    model = build_empty()
    with torch.no_grad():
        model.layer1.conv2.weight.copy_(nm_weight(model.layer1.conv2.weight.shape, 2, 4, 1))
        model.layer2.conv1.weight.copy_(nm_weight(model.layer2.conv1.weight.shape, 1, 16, 2))
        model.layer2.conv2.weight.copy_(nm_weight(model.layer2.conv2.weight.shape, 1, 8, 3))
        model.layer2.conv2.weight[0, :8, 0, 0] = 0.0  # ... one all-zero block: 1:8 plus zeros reads unstructured
    return model.to(dtype).eval()


ZOO_RECIPE = {"model": {"source": "zoo", "id": "resnet_digits"}, "steps": [{"pass": "magnitude"}]}


def test_nm_export_packs_only_the_nm_tensors_and_unpacks_them_bit_identically(tmp_path):
    model = sparse_resnet()
    out = tmp_path / "nm"
    compressx.save(model, out, sparse_format="nm")
    manifest = compressx.read_manifest(out)
    assert manifest["model"]["format"] == "torch"  # no recipe: a plain torch module
    assert manifest["sparsity"]["layer1.conv2.weight"] == {"sparsity": 0.5, "pattern": "2:4"}
    assert manifest["sparsity"]["layer2.conv1.weight"] == {"sparsity": 0.9375, "pattern": "1:16"}
    assert manifest["sparsity"]["layer2.conv2.weight"]["pattern"] == "unstructured"
    packed = manifest["sparse_format"]
    assert packed["format"] == "nm" and packed["tensors"] == 2
    state = model.state_dict()
    dense_bytes = sum(state[n].numel() * 4 for n in ("layer1.conv2.weight", "layer2.conv1.weight"))
    assert packed["dense_bytes"] == dense_bytes and packed["ratio"] < 0.6
    unpacked = load_sparse_state_dict(out)
    assert sorted(unpacked) == ["layer1.conv2.weight", "layer2.conv1.weight"]
    for name, weight in unpacked.items():
        assert weight.dtype == state[name].dtype and torch.equal(weight, state[name]), name
    with pytest.raises(ExportError, match="plain torch module"):
        compressx.load(out)
    reloaded = compressx.load(out, model=build_empty())
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())


def test_nm_export_with_no_nm_tensor_packs_nothing(tmp_path, caplog):
    torch.manual_seed(0)
    out = tmp_path / "dense"
    with caplog.at_level("WARNING"):
        compressx.save(build_empty(), out, sparse_format="nm")
    assert "packs nothing" in caplog.text
    assert compressx.read_manifest(out)["sparse_format"]["tensors"] == 0
    assert load_sparse_state_dict(out) == {}


def test_corrupt_nm_file_is_refused(tmp_path):
    out = tmp_path / "nm"
    compressx.save(sparse_resnet(), out, sparse_format="nm")
    path = out / "sparse.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sparse.safetensors' is corrupt"):
        load_sparse_state_dict(out)


def test_zoo_module_export_reloads_without_model(tmp_path):
    model = sparse_resnet()
    out = tmp_path / "zoo"
    compressx.save(model, out, recipe=parse_recipe(ZOO_RECIPE), sparse_format="nm")
    manifest = compressx.read_manifest(out)
    assert manifest["model"] == {
        "class": "compressx.zoo.resnet_digits.ResNetDigits",
        "dtype": "float32",
        "format": "zoo",
        "member": "resnet_digits",
    }
    assert json.loads((out / "config.json").read_text()) == manifest["model"]
    reloaded = compressx.load(out)
    assert type(reloaded) is ResNetDigits and not reloaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(reloaded(x), model(x))


def test_zoo_export_of_an_unknown_member_is_one_clear_error(tmp_path):
    out = tmp_path / "zoo"
    compressx.save(sparse_resnet(), out, recipe=parse_recipe(ZOO_RECIPE))
    config = json.loads((out / "config.json").read_text())
    manifest = compressx.read_manifest(out)
    manifest["model"] = {**config, "member": "resnet_digitz"}
    (out / "compressx.json").chmod(0o644)
    (out / "compressx.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="unknown zoo model 'resnet_digitz'.*did you mean 'resnet_digits'"):
        compressx.load(out)


def test_zoo_export_keeps_the_dtype(tmp_path):
    # A bfloat16 zoo model (model.dtype: bfloat16 in its recipe) must reload as bfloat16, as it was exported.
    model = sparse_resnet(torch.bfloat16)
    recipe = parse_recipe({**ZOO_RECIPE, "model": {"source": "zoo", "id": "resnet_digits", "dtype": "bfloat16"}})
    out = tmp_path / "bf16"
    compressx.save(model, out, recipe=recipe)
    reloaded = compressx.load(out)
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}


def test_export_of_an_unfinalized_training_pass_is_refused_or_reloads(tmp_path):
    # A model still carrying a training pass's parametrizations (prepare() without finalize()) must not become an
    # export that save() accepts but load() cannot rebuild: either save refuses it, or the export reloads.
    torch.manual_seed(0)
    model = build_empty()
    compressx.prepare(model, "lbc", {"pattern": "2:4", "end_epoch": 1})
    out = tmp_path / "unfinalized"
    try:
        compressx.save(model, out, recipe=parse_recipe(ZOO_RECIPE))
    except ExportError:
        return
    reloaded = compressx.load(out)
    assert type(reloaded) is ResNetDigits
