"""models/weights.py and models/checkpoint.py: every checkpoint layout, dtypes, sharded loads,
random weights, orbax round trips, and the errors users see."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.torch import load_file, save_file

from _hf_helpers import make_hf_opt, save_pytorch_bin, save_renamed_safetensors, save_safetensors
from dsjax.models import weights
from dsjax.models.checkpoint import restore_params, save_params
from dsjax.models.opt import OPTConfig
from dsjax.models.registry import config_from_dir, config_from_name
from dsjax.models.weights import dummy_params, load_hf_params, load_params


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_opt("proj_post_ln", seed=2)


@pytest.fixture(scope="module")
def hf_dirs(hf_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "safetensors": save_safetensors(hf_model, root / "st"),
        "sharded_safetensors": save_safetensors(hf_model, root / "st_sharded", max_shard_size="30KB"),
        "bin": save_pytorch_bin(hf_model, root / "bin"),
        "sharded_bin": save_pytorch_bin(hf_model, root / "bin_sharded", shards=3),
        "decoder_prefix": save_renamed_safetensors(hf_model, root / "decoder", "decoder."),
        "no_prefix": save_renamed_safetensors(hf_model, root / "bare", ""),
    }


@pytest.fixture(scope="module")
def config(hf_dirs):
    return config_from_dir(hf_dirs["safetensors"])


@pytest.fixture(scope="module")
def params(hf_dirs, config):
    return load_hf_params(hf_dirs["safetensors"], config)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_leaves_are_the_hf_tensors(params, hf_model, config):
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    d = "model.decoder."
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], sd[d + "embed_tokens.weight"])
    np.testing.assert_array_equal(params["project_in"]["kernel"], sd[d + "project_in.weight"].T)
    for i in range(config.num_hidden_layers):
        layer = f"{d}layers.{i}."
        np.testing.assert_array_equal(params["layers"]["self_attn"]["v_proj"]["kernel"][i],
                                      sd[layer + "self_attn.v_proj.weight"].T)
        np.testing.assert_array_equal(params["layers"]["self_attn"]["o_proj"]["bias"][i],
                                      sd[layer + "self_attn.out_proj.bias"])
        np.testing.assert_array_equal(params["layers"]["mlp"]["fc2"]["bias"][i],
                                      sd[layer + "fc2.bias"])
        np.testing.assert_array_equal(params["layers"]["self_attn_layer_norm"]["scale"][i],
                                      sd[layer + "self_attn_layer_norm.weight"])
    assert "final_layer_norm" not in params  # post-LN OPT has none
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), config.abstract_params())


@pytest.mark.parametrize("layout", ["sharded_safetensors", "bin", "sharded_bin",
                                    "decoder_prefix", "no_prefix"])
def test_every_checkpoint_layout_loads_the_same(hf_dirs, config, params, layout):
    assert_trees_equal(load_hf_params(hf_dirs[layout], config), params)


@pytest.mark.parametrize("dtype", ["bfloat16", jnp.float16])
def test_dtype_cast(hf_dirs, config, params, dtype):
    loaded = load_hf_params(hf_dirs["bin"], config, dtype)
    assert_trees_equal(loaded, jax.tree.map(lambda x: x.astype(dtype), params))


def test_unsupported_dtype(hf_dirs, config):
    with pytest.raises(ValueError, match="float64.*bfloat16"):
        load_hf_params(hf_dirs["safetensors"], config, "float64")


def tp_shardings(config, mesh):
    """Megatron-style: columns of q/k/v/fc1, rows of o_proj/fc2, vocab rows; layers over 'pp'."""
    specs = {"q_proj": P("pp", None, "tp"), "k_proj": P("pp", None, "tp"),
             "v_proj": P("pp", None, "tp"), "fc1": P("pp", None, "tp"),
             "o_proj": P("pp", "tp", None), "fc2": P("pp", "tp", None)}

    def spec(path, aval):
        keys = [k.key for k in path]
        if keys[0] == "layers":
            return NamedSharding(mesh, specs.get(keys[-2], P("pp")) if keys[-1] == "kernel" else P("pp"))
        return NamedSharding(mesh, P("tp") if keys[0] == "embed_tokens" else P())

    return jax.tree_util.tree_map_with_path(spec, config.abstract_params())


def test_sharded_load_reads_only_each_devices_slice(hf_dirs, config, params, monkeypatch):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("pp", "tp"))
    shardings = tp_shardings(config, mesh)
    reads = []
    original = weights.SafetensorsStore.read

    def recording_read(self, name, index):
        out = original(self, name, index)
        reads.append((name, out.size, int(np.prod(self.shape(name)))))
        return out

    monkeypatch.setattr(weights.SafetensorsStore, "read", recording_read)
    loaded = load_hf_params(hf_dirs["sharded_safetensors"], config, shardings=shardings)
    assert_trees_equal(jax.device_get(loaded), jax.device_get(params))
    for leaf, sharding in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings)):
        assert leaf.sharding == sharding
    # Each tensor-parallel weight is read a quarter at a time, never whole.
    fc1 = [(size, full) for name, size, full in reads if name.endswith("fc1.weight")]
    assert fc1 and all(size == full // 4 for size, full in fc1)


def test_missing_directory_and_files(tmp_path, config):
    with pytest.raises(FileNotFoundError, match="model directory .*nope.* not found"):
        load_hf_params(tmp_path / "nope", config)
    with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
        load_hf_params(tmp_path, config)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        config_from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    with pytest.raises(ValueError, match="'bloom' is not supported.*gpt2, llama, mistral, opt"):
        config_from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ValueError, match="lacks n_layer, n_head"):
        config_from_dir(tmp_path)


def test_index_naming_a_missing_shard(hf_dirs, config, tmp_path):
    src = hf_dirs["sharded_safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text(
        (src / "model.safetensors.index.json").read_text())
    with pytest.raises(FileNotFoundError, match="lists missing files.*model-00001"):
        load_hf_params(tmp_path, config)


def _edited_checkpoint(hf_dirs, tmp_path, edit):
    tensors = load_file(hf_dirs["safetensors"] / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_wrong_shape_names_the_tensor_before_reading_any(hf_dirs, config, tmp_path, monkeypatch):
    def truncate(t):
        t["model.decoder.layers.1.fc1.weight"] = t["model.decoder.layers.1.fc1.weight"][:-1].clone()
    path = _edited_checkpoint(hf_dirs, tmp_path, truncate)
    reads = []
    original = weights.SafetensorsStore.read
    monkeypatch.setattr(weights.SafetensorsStore, "read",
                        lambda self, name, index: reads.append(name) or original(self, name, index))
    with pytest.raises(ValueError, match=r"layers\.1\.fc1\.weight has shape \[191, 96\], "
                                         r"expected \[192, 96\]"):
        load_hf_params(path, config)
    assert reads == []  # a bad checkpoint fails before loading anything


def test_missing_tensor_is_named(hf_dirs, config, tmp_path):
    path = _edited_checkpoint(hf_dirs, tmp_path,
                              lambda t: t.pop("model.decoder.layers.1.self_attn.v_proj.bias"))
    with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.v_proj\.bias missing"):
        load_hf_params(path, config)
    path = _edited_checkpoint(hf_dirs, tmp_path,
                              lambda t: t.pop("model.decoder.embed_tokens.weight"))
    with pytest.raises(KeyError, match="embed_tokens.weight missing"):
        load_hf_params(path, config)


def test_config_of_another_size_is_rejected(hf_dirs, config):
    with pytest.raises(ValueError, match="expected"):
        load_hf_params(hf_dirs["safetensors"], config_from_name("opt-tiny"))


def test_bin_without_torch_says_how_to_fix(hf_dirs, config, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match="pip install torch.*safetensors"):
        load_hf_params(hf_dirs["bin"], config)


def test_dummy_params_shapes_values_and_seed(config):
    a = dummy_params(config, "bfloat16", seed=0)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), a) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), config.abstract_params(jnp.bfloat16))
    ln = a["layers"]["final_layer_norm"]
    assert np.all(np.asarray(ln["scale"]) == 1) and np.all(np.asarray(ln["bias"]) == 0)
    q = np.asarray(a["layers"]["self_attn"]["q_proj"]["kernel"], np.float32)
    assert 0.015 < q.std() < 0.025 and abs(q.mean()) < 0.005
    assert not np.array_equal(q[0], q[1])  # layers differ
    assert_trees_equal(dummy_params(config, "bfloat16", seed=0), a)
    b = dummy_params(config, "bfloat16", seed=1)
    assert not np.array_equal(np.asarray(b["embed_tokens"]["embedding"]),
                              np.asarray(a["embed_tokens"]["embedding"]))


def test_dummy_params_on_shardings(config):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("pp", "tp"))
    shardings = tp_shardings(config, mesh)
    sharded = dummy_params(config, seed=5, shardings=shardings)
    for leaf, sharding in zip(jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
        assert leaf.sharding == sharding
    assert_trees_equal(jax.device_get(sharded), jax.device_get(dummy_params(config, seed=5)))


def test_dummy_params_traces_at_opt_175b_without_memory():
    cfg = config_from_name("opt-175b")
    shapes = jax.eval_shape(lambda: dummy_params(cfg, "bfloat16"))
    assert shapes["layers"]["mlp"]["fc1"]["kernel"].shape == (96, 12288, 49152)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert total == cfg.num_params()


def test_orbax_round_trip_onto_a_mesh(params, config, tmp_path):
    save_params(params, tmp_path / "ckpt", config)
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    # Shard every leaf's last axis over 2 devices when it divides, else replicate.
    shardings = jax.tree.map(
        lambda x: NamedSharding(mesh, P(*[None] * (x.ndim - 1), "tp") if x.shape[-1] % 2 == 0 else P()),
        params)
    restored = restore_params(tmp_path / "ckpt", config, shardings=shardings)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert leaf.sharding == sharding
    assert_trees_equal(jax.device_get(restored), jax.device_get(params))
    # config.json beside it makes the directory self-describing for load_params.
    assert config_from_dir(tmp_path / "ckpt") == OPTConfig(**{**config.__dict__, "name": "ckpt"})
    assert_trees_equal(load_params(tmp_path / "ckpt", config, "bfloat16"),
                       jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    with pytest.raises(FileExistsError, match="already exists"):
        save_params(params, tmp_path / "ckpt", config)


def test_load_params_dispatch(hf_dirs, config, params, tmp_path):
    assert_trees_equal(load_params(hf_dirs["sharded_bin"], config), params)
    assert_trees_equal(load_params(hf_dirs["bin"], config, load_format="pt"), params)
    assert_trees_equal(load_params("opt-whatever", config, load_format="dummy", seed=4),
                       dummy_params(config, seed=4))
    with pytest.raises(FileNotFoundError, match="load_format='dummy'"):
        load_params(tmp_path / "missing", config)
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_params(hf_dirs["safetensors"], config, load_format="pt")
    with pytest.raises(FileNotFoundError, match="not an orbax checkpoint"):
        load_params(hf_dirs["safetensors"], config, load_format="orbax")
    with pytest.raises(ValueError, match="unknown load_format"):
        load_params(hf_dirs["safetensors"], config, load_format="gguf")


# Parameter counts the model cards publish (billions; GPT-2 in millions / 1000).
PUBLISHED_PARAMS = {"opt-13b": 12.85, "llama-2-7b": 6.74, "llama-2-70b": 68.98,
                    "llama-3.1-8b": 8.03, "llama-3.1-70b": 70.55, "mistral-7b": 7.24,
                    "qwen2.5-7b": 7.62, "qwen2.5-72b": 72.71, "qwen3-8b": 8.19,
                    "gpt2": 0.124, "gpt2-xl": 1.558}


def test_every_named_size_builds_with_its_published_parameter_count():
    from dsjax.models.registry import known_sizes
    for name in known_sizes():
        config = config_from_name(name)
        assert config.name == name and config.num_hidden_layers > 0
    for name, billions in PUBLISHED_PARAMS.items():
        assert config_from_name(name).num_params() / 1e9 == pytest.approx(billions, rel=0.005), name
