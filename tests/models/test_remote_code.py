"""Saved students load without codexmini (trust_remote_code), and `import codexmini` registers the Auto classes."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from codexmini import CodexMiniConfig, CodexMiniForCausalLM
from codexmini.models import remote_code
from codexmini.models.configuration import HF_LAYER_TYPES, LAYER_TYPES
from codexmini.models.remote_code import AUTO_MAP, RemoteCodeError, flatten
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
PROMPT = "def add(a, b):"

# Run in a fresh interpreter where `import codexmini` fails, from a folder outside the repository and with the
# repository off sys.path (the editable install's finder is refused by the blocker too).
NO_CODEXMINI = f'''
import sys
from pathlib import Path
class _NoCodexmini:
    def find_spec(self, name, path=None, target=None):
        if name == "codexmini" or name.startswith("codexmini."):
            raise ImportError(f"codexmini is not installed here ({{name}})")
sys.meta_path.insert(0, _NoCodexmini())
sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != Path({str(REPO)!r})]
'''


def _python(code: str, tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
               TOKENIZERS_PARALLELISM="false")
    paths = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _student(quantized: bool = False) -> CodexMiniForCausalLM:
    torch.manual_seed(0)
    # Every kind of layer and the parameters only some layers have (hedgehog's weights, the decay); a wider init
    # than the default makes the random model's greedy text vary instead of repeating one token.
    config = tiny_config(num_hidden_layers=3, layer_types=["softmax", "linear", "hybrid"], feature_map="hedgehog",
                         linear_decay=True, initializer_range=0.2, tie_word_embeddings=not quantized)
    model = CodexMiniForCausalLM(config).eval()
    if quantized:
        from codexmini.quantize import QuantizeConfig, quantize_model

        model, _ = quantize_model(model, QuantizeConfig(method="rtn", default="int4_g32",
                                                        rules=[{"pattern": r"mlp\.down_proj", "scheme": "int8"},
                                                               {"pattern": "lm_head", "scheme": "int8"}]))
        assert model.config.quantization_scheme["model.layers.0.mlp.down_proj"] == "int8"
    return model


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int4-int8"])
def test_saved_student_loads_with_trust_remote_code_where_codexmini_is_not_installed(tmp_path, tiny_tokenizer,
                                                                                     quantized):
    model = _student(quantized)
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    ids = tiny_tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=16, do_sample=False)
        torch.save(model(expected).logits, tmp_path / "expected_logits.pt")
    expected_text = tiny_tokenizer.decode(expected[0])
    assert len(set(expected[0, ids.shape[1]:].tolist())) > 3  # a meaningful comparison, not one token repeated

    _python(NO_CODEXMINI + textwrap.dedent(f'''
        import json
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        folder = {str(folder)!r}
        tok = AutoTokenizer.from_pretrained(folder)  # no trust_remote_code: the tokenizer needs no model code
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        ids = tok({PROMPT!r}, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False)
            logits = model(out).logits
        torch.save(logits, "remote_logits.pt")
        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        # Saved again from the remote code, the folder still loads the same way.
        model.save_pretrained("resaved")
        again = AutoModelForCausalLM.from_pretrained("resaved", trust_remote_code=True).eval()
        with torch.no_grad():
            same = torch.equal(again.generate(ids, max_new_tokens=16, do_sample=False), out)
        assert not any(m == "codexmini" or m.startswith("codexmini.") for m in sys.modules)
        # (to a file: transformers' "run the custom code?" prompt, answered by EOF, goes to stdout)
        quant = sorted({{type(m).__name__ for m in model.modules() if "Quant" in type(m).__name__}})
        Path("remote.json").write_text(json.dumps({{
            "text": tok.decode(out[0]), "ids": out[0].tolist(), "layer_types": config.layer_types,
            "model": type(model).__module__, "base": type(base).__name__, "resaved_same": same, "quant": quant}}))
    '''), tmp_path)
    remote = json.loads((tmp_path / "remote.json").read_text())
    assert remote["model"].startswith("transformers_modules.") and remote["base"] == "CodexMiniModel"
    assert remote["layer_types"] == ["softmax", "linear", "hybrid"]
    assert remote["ids"] == expected[0].tolist() and remote["text"] == expected_text
    torch.testing.assert_close(torch.load(tmp_path / "remote_logits.pt"), torch.load(tmp_path / "expected_logits.pt"),
                               atol=1e-5, rtol=1e-5)
    assert remote["resaved_same"]
    assert remote["quant"] == (["QuantEmbedding", "QuantLinear"] if quantized else [])  # the int8 table too


def test_lm_eval_hf_model_reads_the_folder_without_codexmini(tmp_path, tiny_tokenizer):
    """What `lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True` builds, scored with and
    without codexmini importable: the same numbers."""
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (pip install lm-eval)")
    folder = tmp_path / "student"
    _student().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    run = textwrap.dedent(f'''
        import json
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained={str(folder)!r}, trust_remote_code=True, device="cpu", batch_size=2)
        ll = lm.loglikelihood([Instance("loglikelihood", {{}}, ("def add(a, b):", " return a + b"), 0),
                               Instance("loglikelihood", {{}}, ("class Stack:", " pass"), 1)])
        until = {{"until": ["\\n\\n"], "max_gen_toks": 8, "do_sample": False}}
        gen = lm.generate_until([Instance("generate_until", {{}}, ("def add(a, b):", until), 0),
                                 Instance("generate_until", {{}}, ("hello world", until), 1)])
        Path("lm_eval.json").write_text(json.dumps({{"ll": ll, "gen": gen, "model": type(lm.model).__module__}}))
    ''')
    _python(NO_CODEXMINI + run, tmp_path)
    remote = json.loads((tmp_path / "lm_eval.json").read_text())
    _python(f"import sys\nfrom pathlib import Path\nsys.path.insert(0, {str(REPO)!r})\nimport codexmini\n" + run, tmp_path)
    local = json.loads((tmp_path / "lm_eval.json").read_text())
    assert remote["model"].startswith("transformers_modules.") and local["model"] == "codexmini.models.modeling"
    assert remote["gen"] == local["gen"] and all(isinstance(g, str) and g for g in remote["gen"])
    for (a, greedy_a), (b, greedy_b) in zip(remote["ll"], local["ll"]):
        assert a == pytest.approx(b, abs=1e-4) and a < 0 and greedy_a == greedy_b


def test_folder_loads_as_usual_with_codexmini_and_transformers_stays_quiet(tmp_path, capfd):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = _student()
    model.save_pretrained(tmp_path)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = AutoConfig.from_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        trusted = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(config) is CodexMiniConfig and config.auto_map == AUTO_MAP
    # The registered classes win over the folder's copy, with or without trust_remote_code.
    assert type(loaded) is CodexMiniForCausalLM and type(trusted) is CodexMiniForCausalLM
    err = capfd.readouterr().err
    assert "custom code" not in err and "trust_remote_code" not in err, err
    assert not [w for w in caught if "auto_map" in str(w.message) or "remote" in str(w.message)]
    ids = torch.randint(4, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_config_json_speaks_transformers_layer_types(tmp_path):
    from transformers import PreTrainedConfig
    from transformers.configuration_utils import ALLOWED_ATTN_LAYER_TYPES

    assert set(HF_LAYER_TYPES) == set(LAYER_TYPES) and set(HF_LAYER_TYPES.values()) <= set(ALLOWED_ATTN_LAYER_TYPES)
    config = tiny_config(num_hidden_layers=3, layer_types=["softmax", "linear", "hybrid"])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_types"] == ["full_attention", "linear_attention", "hybrid"]
    # What AutoTokenizer falls back to where codexmini is not installed: a plain config, validated by transformers.
    assert PreTrainedConfig.from_pretrained(tmp_path).layer_types == saved["layer_types"]
    assert CodexMiniConfig.from_pretrained(tmp_path).layer_types == ["softmax", "linear", "hybrid"]
    # Folders saved before keep loading.
    (tmp_path / "config.json").write_text(json.dumps({**saved, "layer_types": ["softmax", "linear", "hybrid"]}))
    assert CodexMiniConfig.from_pretrained(tmp_path).layer_types == ["softmax", "linear", "hybrid"]
    assert config.to_dict()["layer_types"] == ["softmax", "linear", "hybrid"]  # in memory: codexmini's names


def test_resave_replaces_the_code_and_leaves_other_files(tmp_path):
    (tmp_path / "codexmini_models_gone.py").write_text("# a module an older codexmini had\n")
    (tmp_path / "notes.py").write_text("# the user's\n")
    tiny_config().save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "codexmini_models_gone.py" not in files and "notes.py" in files
    assert {"configuration_codexmini.py", "modeling_codexmini.py", "config.json"} <= files
    # Everything the model code needs is in the folder, and transformers' loader finds all of it from auto_map.
    from transformers.dynamic_module_utils import get_relative_import_files

    needed = {Path(p).name for p in get_relative_import_files(tmp_path / "modeling_codexmini.py")}
    assert needed | {"modeling_codexmini.py"} == {f for f in files if f.endswith(".py") and f != "notes.py"}


# --------------------------------------------------------------------------- the flattener on a made-up package
def _fake_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / "codexmini" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_flattener_rewrites_every_import_form(tmp_path, monkeypatch):
    _fake_package(tmp_path, {
        "models/configuration.py": '''
            from __future__ import annotations
            import json
            from ..ops.names import NAMES
            CONFIG = json.dumps(NAMES)
        ''',
        "models/modeling.py": '''
            """Docstring."""
            import torch
            from codexmini.ops import rope, norm as rms
            from . import configuration
            import codexmini.ops.norm as norm_module
            try:
                import not_a_real_package  # optional: skipped by the loader, allowed here
            except ImportError:
                not_a_real_package = None

            def late():
                from .configuration import (
                    CONFIG,
                )
                return CONFIG

            def value():
                return rope.ROPE + rms.NORM + norm_module.NORM + configuration.CONFIG + late()
        ''',
        "ops/__init__.py": '"""Re-exports nothing."""\n',
        "ops/names.py": "NAMES = ['a']\n",
        "ops/rope.py": "from .names import NAMES\nROPE = NAMES[0]\n",
        "ops/norm.py": "NORM = 'n'\n",
    })
    monkeypatch.setattr(remote_code, "_PACKAGE_DIR", tmp_path / "codexmini")
    files = flatten()
    assert sorted(files) == ["codexmini_ops_names.py", "codexmini_ops_norm.py", "codexmini_ops_rope.py",
                             "configuration_codexmini.py", "modeling_codexmini.py"]
    assert "from .codexmini_ops_names import NAMES" in files["configuration_codexmini.py"]
    assert '"""Docstring."""' in files["modeling_codexmini.py"]  # the rest of the text is untouched
    # The flat files run as a package, and transformers' loader follows them from the entry file.
    pkg = tmp_path / "flat" / "saved"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name, text in files.items():
        (pkg / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "flat"))
    import importlib

    modeling = importlib.import_module("saved.modeling_codexmini")
    assert modeling.value() == 'ann' + '["a"]' + '["a"]'
    from transformers.dynamic_module_utils import get_relative_import_files

    found = {Path(p).name for p in get_relative_import_files(pkg / "modeling_codexmini.py")}
    assert found == set(files) - {"modeling_codexmini.py"}


@pytest.mark.parametrize("source, message", [
    ("from ..distill.loop import distill\n", r"codexmini\.distill\.loop \(codexmini\.distill\.loop <- "
                                             r"codexmini\.models\.modeling\)"),
    ("from ..pipeline import run\n", "only codexmini.models and codexmini.ops"),
    ("import hydra\n", "imports hydra"),
    ("import codexmini.ops.norm\n", "cannot be flattened"),
    ("import torch; from ..ops.norm import NORM\n", "on a line of its own"),
])
def test_flattener_refuses_what_a_folder_cannot_load(tmp_path, monkeypatch, source, message):
    _fake_package(tmp_path, {"models/configuration.py": "X = 1\n", "models/modeling.py": source,
                             "ops/norm.py": "NORM = 1\n", "distill/loop.py": "distill = 1\n",
                             "pipeline.py": "run = 1\n"})
    monkeypatch.setattr(remote_code, "_PACKAGE_DIR", tmp_path / "codexmini")
    with pytest.raises(RemoteCodeError, match=message):
        flatten()


def test_the_real_closure_stays_inside_models_and_ops():
    files = flatten()
    assert {"configuration_codexmini.py", "modeling_codexmini.py"} <= set(files)
    assert all(f in ("configuration_codexmini.py", "modeling_codexmini.py") or
               f.startswith(("codexmini_models_", "codexmini_ops_")) for f in files), sorted(files)
    assert "codexmini_models_remote_code.py" not in files  # the flattener itself stays home


# --------------------------------------------------------------------------- registration by `import codexmini`
def test_runtime_import_does_not_import_transformers(tmp_path):
    out = _python(textwrap.dedent(f'''
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        t = time.perf_counter()
        import codexmini.runtime
        print(time.perf_counter() - t)
        assert "transformers" not in sys.modules, "codexmini.runtime imported transformers"
        assert "codexmini.models" not in sys.modules
    '''), tmp_path)
    assert float(out.stdout.split()[-1]) < 60


def test_import_codexmini_registers_the_auto_classes(tmp_path):
    folder = tmp_path / "student"
    CodexMiniForCausalLM(tiny_config()).save_pretrained(folder)
    (folder / "modeling_codexmini.py").unlink()  # prove the registered classes load it, not the folder's copy
    out = _python(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import codexmini
        assert "transformers" not in sys.modules
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        print(type(AutoConfig.for_model("codexmini")).__module__)
        print(type(AutoModelForCausalLM.from_pretrained({str(folder)!r})).__module__)
        print(type(AutoModel.from_pretrained({str(folder)!r})).__name__)
    '''), tmp_path)
    assert out.stdout.split() == ["codexmini.models.configuration", "codexmini.models.modeling", "CodexMiniModel"]


def test_codexmini_imports_where_transformers_is_not_installed(tmp_path):
    out = _python(textwrap.dedent(f'''
        import sys
        class _NoTransformers:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
        sys.meta_path.insert(0, _NoTransformers())
        sys.path.insert(0, {str(REPO)!r})
        import codexmini
        import codexmini.runtime
        try:
            import transformers
        except ModuleNotFoundError as err:
            print("no transformers:", err)
        assert "transformers" not in sys.modules
    '''), tmp_path)
    assert "no transformers: No module named 'transformers'" in out.stdout
