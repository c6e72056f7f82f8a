"""chatrlhf.utils.models on tiny saved models of every family: pad policy, heads, dropout, LoRA targets and merge."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from chatrlhf.utils import models

# peft notes that GPT-2's Conv1D needs fan_in_fan_out and sets it itself.
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")

FAMILIES = ("llama", "opt", "gpt2", "qwen2", "gpt_neox", "bloom")
# Layer names inside the transformer blocks, whatever the family: model.layers.N, model.decoder.layers.N, transformer.h.N
BLOCK = re.compile(r"(^|\.)(layers|h)\.\d+\.")
DROPOUT_FIELDS = {
    "llama": ["attention_dropout"],
    "qwen2": ["attention_dropout"],
    "opt": ["dropout", "attention_dropout"],
    "gpt2": ["resid_pdrop", "embd_pdrop", "attn_pdrop"],
    "gpt_neox": ["attention_dropout", "hidden_dropout"],
    "bloom": ["attention_dropout", "hidden_dropout"],
}


def copy_with_tokenizer(src, dst, **special):
    """A copy of a saved tiny model whose tokenizer has the given special tokens (None removes one)."""
    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    for key, value in special.items():
        setattr(tok, key, value)
    tok.save_pretrained(dst)
    return dst


def batch(tok, texts=("hello there, how are you?", "hi")):
    return tok(list(texts), padding=True, return_tensors="pt")


def linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


# ------------------------------------------------------------------------------------------ tokenizer / pad

@pytest.mark.parametrize("chat_template", [True, False])
def test_load_tokenizer_sets_a_pad_that_is_not_eos(tiny_model_dir, chat_template):
    tok = models.load_tokenizer(str(tiny_model_dir("llama", chat_template=chat_template)))
    assert tok.eos_token == ("<|im_end|>" if chat_template else "</s>")
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"  # the unk/bos token: an existing special, so nothing is added
    assert tok.padding_side == "right"
    enc = batch(tok)
    assert enc["input_ids"][1, -1] == tok.pad_token_id and enc["attention_mask"][1, -1] == 0


def test_load_tokenizer_padding_side(tiny_model_dir):
    tok = models.load_tokenizer(str(tiny_model_dir("llama")), padding_side="left")
    assert tok.padding_side == "left"
    assert batch(tok)["attention_mask"][1, 0] == 0


def test_existing_distinct_pad_is_kept(tiny_model_dir, tmp_path):
    path = copy_with_tokenizer(tiny_model_dir("llama"), tmp_path / "m", pad_token="<pad>")
    tok = models.load_tokenizer(str(path))
    assert tok.pad_token == "<pad>"


def test_pad_equal_to_eos_is_replaced(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    eos = AutoTokenizer.from_pretrained(src).eos_token
    tok = models.load_tokenizer(str(copy_with_tokenizer(src, tmp_path / "m", pad_token=eos)))
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("head", ["causal_lm", "score"])
def test_pad_is_added_and_embeddings_grow_when_no_candidate(tiny_model_dir, tmp_path, head):
    src = tiny_model_dir("llama")
    eos = AutoTokenizer.from_pretrained(src).eos_token
    path = copy_with_tokenizer(src, tmp_path / "m", bos_token=eos, unk_token=None)  # bos = eos, no unk
    tok = models.load_tokenizer(str(path))
    base = AutoModelForCausalLM.from_pretrained(path)
    vocab = base.get_input_embeddings().num_embeddings
    assert tok.pad_token == models.PAD_TOKEN and tok.pad_token_id == vocab == len(tok) - 1
    assert tok.pad_token_id != tok.eos_token_id

    model = models.load_model(str(path), tok, head=head)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    # The old rows are untouched.
    torch.testing.assert_close(model.get_input_embeddings().weight[:vocab], base.get_input_embeddings().weight)
    enc = batch(tok)
    assert (enc["input_ids"] == tok.pad_token_id).any()
    with torch.no_grad():
        out = model(**enc).logits
    assert torch.isfinite(out).all()
    assert out.shape == ((2, enc["input_ids"].shape[1], len(tok)) if head == "causal_lm" else (2, 1))


def test_tokenizer_without_eos_is_an_error(tiny_model_dir, tmp_path):
    path = copy_with_tokenizer(tiny_model_dir("llama"), tmp_path / "m", eos_token=None)
    with pytest.raises(ValueError, match="EOS"):
        models.load_tokenizer(str(path))


def test_missing_model_path_names_it(tmp_path, tokenizer):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(OSError, match="no-such-model"):
        models.load_tokenizer(missing)
    with pytest.raises(OSError, match="no-such-model"):
        models.load_model(missing, tokenizer)


@pytest.mark.parametrize("name", ["./no/such/dir", "/abs/missing", "~/no-such-chatrlhf-model", "a/b/c"])
def test_missing_local_folder_is_named_not_sent_to_the_hub(name, tokenizer, monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError(f"from_pretrained was called for {args[0]!r}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    full = re.escape(str(Path(name).expanduser().absolute()).replace("/./", "/"))
    with pytest.raises(FileNotFoundError, match=rf"no such folder: {full}"):
        models.load_tokenizer(name)
    with pytest.raises(FileNotFoundError, match=rf"no such folder: {full}"):
        models.load_model(name, tokenizer)


def test_a_hub_id_still_goes_to_the_hub(monkeypatch, tmp_path):
    import transformers

    monkeypatch.chdir(tmp_path)  # no local folder of that name
    asked = []

    def fake(name, **kwargs):
        asked.append((name, kwargs.get("trust_remote_code")))
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    with pytest.raises(OSError, match="cannot load a tokenizer from 'some-org/some-model'"):
        models.load_tokenizer("some-org/some-model")
    assert asked == [("some-org/some-model", False)]


@pytest.fixture
def custom_code_model(tiny_model_dir, tmp_path, monkeypatch):
    """A model folder whose config and tokenizer point at their own Python files (auto_map); importing either
    file creates a marker. Returns (folder, marker)."""
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "custom"))
    marker = tmp_path / "custom-code-ran"
    for module, base, cls in (("configuration_evil", "LlamaConfig", "EvilConfig"),
                              ("tokenization_evil", "PreTrainedTokenizerFast", "EvilTokenizer")):
        (folder / f"{module}.py").write_text(
            f"open({str(marker)!r}, 'w').close()\nfrom transformers import {base}\n\n\n"
            f"class {cls}({base}):\n    model_type = 'chatrlhf_evil'\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="chatrlhf_evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="EvilTokenizer",
                      auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    # Left unset, transformers asks on the terminal and runs the code on "y": answer it so.
    monkeypatch.setattr("builtins.input", lambda prompt="": "y")
    return folder, marker


def test_code_in_a_model_folder_never_runs(custom_code_model, tokenizer):
    folder, marker = custom_code_model
    with pytest.raises(ValueError, match=rf"model '{re.escape(str(folder))}' needs its own Python code"):
        models.load_model(str(folder), tokenizer)
    with pytest.raises(ValueError, match="does not run code from model files"):
        models.load_tokenizer(str(folder))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ load_model

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["causal_lm", "score"])
def test_load_model_every_family_and_head(tiny_model_dir, family, head):
    path = str(tiny_model_dir(family))  # a causal-LM checkpoint, also for the score head
    tok = models.load_tokenizer(path)
    model = models.load_model(path, tok, head=head)
    expected_cls = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    assert type(model).__name__ in {c.__name__ for c in expected_cls._model_mapping.values()}
    assert model.config.pad_token_id == tok.pad_token_id
    assert all(p.dtype == torch.float32 for p in model.parameters())
    enc = batch(tok)
    with torch.no_grad():
        out = model(**enc).logits
    assert torch.isfinite(out).all()
    if head == "causal_lm":
        assert out.shape == (2, enc["input_ids"].shape[1], len(tok))
    else:
        assert out.shape == (2, 1) and model.config.num_labels == 1
        w = model.score.weight
        assert w.shape == (1, model.config.hidden_size) and torch.isfinite(w).all() and w.abs().sum() > 0
        # The fresh head keeps initial scores O(1): std about 1/sqrt(hidden + 1).
        assert w.std().item() < 3.0 / (model.config.hidden_size + 1) ** 0.5


def test_score_head_from_a_score_checkpoint_is_kept(tiny_model_dir):
    path = tiny_model_dir("llama", head="score")
    saved = AutoModelForSequenceClassification.from_pretrained(path).score.weight
    tok = models.load_tokenizer(str(path))
    model = models.load_model(str(path), tok, head="score")
    torch.testing.assert_close(model.score.weight, saved)


def test_load_model_dtype_and_bad_head(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    tok = models.load_tokenizer(path)
    assert next(models.load_model(path, tok, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="head"):
        models.load_model(path, tok, head="value")


def test_gradient_checkpointing(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    tok = models.load_tokenizer(path)
    model = models.load_model(path, tok, gradient_checkpointing=True)
    assert model.is_gradient_checkpointing and model.config.use_cache is False


# ------------------------------------------------------------------------------------------ dropout

@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_override_sets_the_family_fields(tiny_model_dir, family):
    path = str(tiny_model_dir(family))
    tok = models.load_tokenizer(path)
    untouched = models.load_model(path, tok).config
    model = models.load_model(path, tok, dropout=0.25)
    for key in DROPOUT_FIELDS[family]:
        assert getattr(model.config, key) == 0.25, key
    for key in DROPOUT_FIELDS[family]:
        assert getattr(untouched, key) != 0.25  # None leaves the config as it was
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert all(p == 0.25 for p in dropouts)  # modules were built from the overridden config
    off = models.load_model(path, tok, dropout=0.0).config
    for key in DROPOUT_FIELDS[family]:
        assert getattr(off, key) == 0.0


def test_configure_dropout_on_a_config():
    from transformers import GPT2Config

    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=4, resid_pdrop=0, attn_pdrop=0.1)
    models.configure_dropout(cfg, 0.3)
    assert (cfg.resid_pdrop, cfg.attn_pdrop, cfg.embd_pdrop) == (0.3, 0.3, 0.3)  # an int 0 is overridden too
    assert cfg.n_layer == 1
    models.configure_dropout(cfg, None)
    assert cfg.resid_pdrop == 0.3


def test_dropout_override_when_config_json_has_int_probabilities(tiny_model_dir, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tiny_model_dir("gpt_neox"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(attention_dropout=0, hidden_dropout=0)
    (path / "config.json").write_text(json.dumps(cfg))
    tok = models.load_tokenizer(str(path))
    model = models.load_model(str(path), tok, dropout=0.2)
    assert model.config.attention_dropout == 0.2 and model.config.hidden_dropout == 0.2


# ------------------------------------------------------------------------------------------ LoRA targets

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["causal_lm", "score"])
def test_lora_targets_every_linear_in_the_blocks(tiny_model_dir, family, head):
    path = str(tiny_model_dir(family))
    model = models.load_model(path, models.load_tokenizer(path), head=head)
    targets = models.lora_target_modules(model, None)
    assert len(targets) == len(set(targets))
    expected = {n for n in linear_names(model) if BLOCK.search(n)}
    assert set(targets) == expected and len(expected) >= 8  # 2 blocks x (attention + MLP)
    assert not any(n.split(".")[-1] in models.HEAD_NAMES for n in targets)
    # Every Linear left out is an output head.
    assert all(n.split(".")[-1] in models.HEAD_NAMES for n in linear_names(model) - set(targets))
    if family == "gpt2":
        assert all(isinstance(model.get_submodule(n), Conv1D) for n in targets)


@pytest.mark.parametrize("family,module_name,expected", [
    ("llama", "self_attn", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("llama", "mlp.", {"gate_proj", "up_proj", "down_proj"}),
    ("opt", "decoder.layers.", {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
    ("gpt2", "mlp.", {"c_fc", "c_proj"}),
    ("gpt2", "attn.c_attn", {"c_attn"}),
    ("bloom", "query_key_value", {"query_key_value"}),
])
def test_lora_module_name_filters_by_substring(tiny_model_dir, family, module_name, expected):
    path = str(tiny_model_dir(family))
    model = models.load_model(path, models.load_tokenizer(path))
    targets = models.lora_target_modules(model, module_name)
    assert targets and all(module_name in n for n in targets)
    assert {n.split(".")[-1] for n in targets} == expected
    assert len(targets) == 2 * len(expected)  # both blocks


def test_lora_module_name_selects_one_block(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    model = models.load_model(path, models.load_tokenizer(path))
    targets = models.lora_target_modules(model, "layers.1.")
    assert len(targets) == 7 and all(".layers.1." in n for n in targets)


def test_lora_module_names_separated_by_commas_select_the_union(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    model = models.load_model(path, models.load_tokenizer(path))
    both = models.lora_target_modules(model, "layers.0.,layers.1.")
    assert sorted(both) == sorted(models.lora_target_modules(model, "layers.0.")
                                  + models.lora_target_modules(model, "layers.1."))
    assert len(both) == 14


@pytest.mark.parametrize("module_name", ["no_such_layer", "lm_head", "embed_tokens"])
def test_lora_module_name_without_match_is_a_clear_error(tiny_model_dir, module_name):
    path = str(tiny_model_dir("llama"))
    model = models.load_model(path, models.load_tokenizer(path))
    with pytest.raises(ValueError, match=f"--lora_module_name '{module_name}'"):
        models.lora_target_modules(model, module_name)


# ------------------------------------------------------------------------------------------ add_lora

def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("head", ["causal_lm", "score"])
def test_only_optimize_lora_freezes_the_base(tiny_model_dir, family, head):
    path = str(tiny_model_dir(family))
    model = models.load_model(path, models.load_tokenizer(path), head=head)
    targets = models.lora_target_modules(model, None)  # before wrapping: peft edits `model` in place
    n_targets = len(targets)
    peft_model = models.add_lora(model, dim=4, alpha=None, dropout=0.0, module_name=None,
                                 only_optimize_lora=True, head=head)
    names = trainable(peft_model)
    lora = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    assert len(lora) == 2 * n_targets
    rest = names - lora
    if head == "causal_lm":
        assert rest == set()
    else:
        assert rest and all("score.modules_to_save." in n for n in rest)  # the scalar head always trains
    layer = peft_model.get_submodule("base_model.model." + targets[0])
    assert layer.scaling["default"] == 1 / 4  # DeepSpeed-Chat's scale 1/dim when no alpha is given


@pytest.mark.parametrize("head", ["causal_lm", "score"])
def test_without_only_optimize_lora_the_wrapped_weights_freeze_as_in_dschat(tiny_model_dir, head):
    """DeepSpeed-Chat's LinearLayer_LoRA freezes the weight of every layer it wraps; everything else trains."""
    path = str(tiny_model_dir("llama"))
    model = models.load_model(path, models.load_tokenizer(path), head=head)
    peft_model = models.add_lora(model, dim=4, alpha=16, dropout=0.0, module_name="self_attn",
                                 only_optimize_lora=False, head=head)
    names = trainable(peft_model)
    assert any("embed_tokens" in n for n in names)
    assert not any(n.endswith(".base_layer.weight") for n in names)  # q_proj, k_proj, ...: frozen
    assert any("mlp.gate_proj.weight" in n for n in names)  # not wrapped: trains
    assert any("input_layernorm" in n for n in names)
    assert any(".lora_A." in n for n in names)
    assert not any(".lora_" in n and "mlp" in n for n in names)  # LoRA only where module_name matched
    assert not any(".original_module." in n for n in names)
    if head == "score":
        assert any("score.modules_to_save." in n for n in names)


def test_without_only_optimize_lora_the_wrapped_biases_train(tiny_model_dir):
    path = str(tiny_model_dir("opt", chat_template=False))
    model = models.load_model(path, models.load_tokenizer(path))
    names = trainable(models.add_lora(model, dim=4, alpha=None, dropout=0.0, module_name="decoder.layers.",
                                      only_optimize_lora=False))
    assert any(n.endswith("q_proj.base_layer.bias") for n in names)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in names)


@pytest.mark.parametrize("init,bound", [("dschat", 1 / 4 ** 0.5), ("peft", 1 / 32 ** 0.5)])
def test_lora_a_starts_as_in_dschat_or_peft(tiny_model_dir, init, bound):
    """DeepSpeed-Chat: kaiming_uniform(a=sqrt(5)) of its (in x dim) matrix, fan-in dim: +-1/sqrt(dim);
    peft: of its (dim x in) matrix, fan-in in_features (32 here): +-1/sqrt(in)."""
    path = str(tiny_model_dir("llama"))
    torch.manual_seed(0)
    model = models.load_model(path, models.load_tokenizer(path))
    peft_model = models.add_lora(model, dim=4, alpha=None, dropout=0.0, module_name="q_proj",
                                 only_optimize_lora=True, init=init)
    a = torch.cat([p.flatten() for n, p in peft_model.named_parameters() if ".lora_A." in n])
    b = torch.cat([p.flatten() for n, p in peft_model.named_parameters() if ".lora_B." in n])
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound  # uniform over the whole range
    assert torch.all(b == 0)


def test_default_lora_targets_on_opt_are_dschat_decoder_layers_without_project_in_out(tmp_path):
    """An OPT whose word embeddings are narrower than its hidden size (opt-350m) has project_in/project_out
    Linears outside the blocks: the default leaves them out, as DeepSpeed-Chat's `decoder.layers.` does."""
    import transformers as tf

    model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                           num_attention_heads=4, word_embed_proj_dim=16, max_position_embeddings=64))
    assert isinstance(model.model.decoder.project_in, torch.nn.Linear)
    default = models.lora_target_modules(model, None)
    assert default == models.lora_target_modules(model, "decoder.layers.")
    assert not any("project_" in n for n in default) and len(default) == 12


def test_lora_with_gradient_checkpointing_backprops_into_adapters(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    tok = models.load_tokenizer(path)
    model = models.load_model(path, tok, gradient_checkpointing=True)
    peft_model = models.add_lora(model, dim=4, alpha=8, dropout=0.0, module_name=None, only_optimize_lora=True)
    peft_model.train()
    enc = batch(tok)
    peft_model(**enc, labels=enc["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for n, g in grads.items() if ".lora_A." in n)


# ------------------------------------------------------------------------------------------ merge_lora_state_dict

def test_merge_lora_state_dict_by_hand():
    w, a, b, bias = torch.randn(3, 4), torch.randn(2, 4), torch.randn(3, 2), torch.randn(3)
    sd = {
        "base_model.model.blocks.0.proj.base_layer.weight": w,
        "base_model.model.blocks.0.proj.base_layer.bias": bias,
        "base_model.model.blocks.0.proj.lora_A.default.weight": a,
        "base_model.model.blocks.0.proj.lora_B.default.weight": b,
        "base_model.model.score.original_module.weight": torch.zeros(1, 4),
        "base_model.model.score.modules_to_save.default.weight": torch.ones(1, 4),
        "base_model.model.norm.weight": torch.ones(4),
    }
    out = models.merge_lora_state_dict(sd, scaling=0.5)
    assert set(out) == {"blocks.0.proj.weight", "blocks.0.proj.bias", "score.weight", "norm.weight"}
    torch.testing.assert_close(out["blocks.0.proj.weight"], w + 0.5 * b @ a)
    torch.testing.assert_close(out["score.weight"], torch.ones(1, 4))  # the trained copy, not the original
    assert out["blocks.0.proj.bias"] is bias
    # conv1d: the base weight is stored transposed (in, out), so the delta is too.
    sd_t = {**sd, "base_model.model.blocks.0.proj.base_layer.weight": w.T.contiguous()}
    out_t = models.merge_lora_state_dict(sd_t, scaling=0.5, conv1d=True)
    torch.testing.assert_close(out_t["blocks.0.proj.weight"], (w + 0.5 * b @ a).T)
    # bf16 base weights stay bf16.
    sd_bf16 = {k: v.bfloat16() for k, v in sd.items()}
    assert models.merge_lora_state_dict(sd_bf16, 0.5)["blocks.0.proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("family,conv1d,head", [("llama", False, "causal_lm"), ("gpt2", True, "causal_lm"),
                                                ("llama", False, "score"), ("gpt2", True, "score")])
def test_merge_lora_state_dict_matches_peft(tiny_model_dir, family, conv1d, head):
    path = str(tiny_model_dir(family))
    tok = models.load_tokenizer(path)
    model = models.load_model(path, tok, head=head)
    peft_model = models.add_lora(model, dim=4, alpha=8, dropout=0.0, module_name=None,
                                 only_optimize_lora=True, head=head)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.normal_()  # peft starts B at zero, which would make any merge look right
            elif "modules_to_save" in name:
                p.add_(0.5)  # a trained head must win over the frozen original
    peft_model.eval()
    ids = torch.randint(1, len(tok), (2, 9))  # no pad id, so the score head reads the last position of both
    with torch.no_grad():
        expected_logits = peft_model(input_ids=ids).logits

    merged = models.merge_lora_state_dict({k: v.clone() for k, v in peft_model.state_dict().items()},
                                          scaling=8 / 4, conv1d=conv1d)
    reference = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    assert set(merged) == set(reference)
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)

    cls = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    plain = cls.from_config(model.config).eval()
    result = plain.load_state_dict(merged, strict=False)
    assert [k for k in result.missing_keys if k != "lm_head.weight"] == []
    assert result.unexpected_keys == []
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected_logits, rtol=1e-4, atol=1e-5)
