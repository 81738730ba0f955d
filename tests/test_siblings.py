"""The pieces that sibling scripts keep as deliberate copies (STYLE 5; scripts never import each other) stay
identical, so that a fix to one copy cannot silently miss the others. Read from the source with ast: nothing is imported
or run, and a piece is compared as text, comments and defaults included. (Before, tests/test_finetune.py compared a
few of finetune_full.py's and finetune_lora.py's helpers with inspect.getsource.)"""

import ast
import textwrap

import pytest

from conftest import ROOT

FINETUNE = ("finetune_full.py", "finetune_lora.py")
CHUNKS = ("pretrain.py", "distill.py")  # the two scripts that train on litdata token chunks
TRAINING = ("pretrain.py", "finetune_full.py", "finetune_lora.py", "distill.py", "align.py", "grpo.py")
SUPERVISED = ("finetune_full.py", "finetune_lora.py", "align.py")  # the scripts that train on records held in memory

# (the scripts, the top-level pieces they share; Class.method for one method of a class)
COPIES = [
    (FINETUNE, ["METRICS", "DataArgs", "TrainArgs.__post_init__", "EvalArgs", "CheckpointArgs", "step_loss",
                "validate", "generate_sample", "load_data"]),
    (("finetune_full.py", "finetune_lora.py", "distill.py"), ["make_micro_batches"]),
    (CHUNKS, ["TrainArgs.__post_init__", "EvalArgs", "batches_forever"]),
    (TRAINING, ["CheckpointArgs"]),
    (SUPERVISED, ["TrainArgs.__post_init__", "EvalArgs", "generate_sample"]),
    (("align.py", "grpo.py"), ["QUANTIZE_MODES", "save_checkpoint_dir", "load_training_state"]),
    (("generate.py", "serve.py"), ["load"]),  # a checkpoint or an adapter, checked and loaded for sampling
]
# The same fields in the same order, where the defaults differ (finetune_lora's learning rates are LoRA's)
FIELDS = [(SUPERVISED, "TrainArgs"), (CHUNKS, "TrainArgs")]
# Statements inside the functions, the same in every training script: the resolved arguments that every checkpoint's
# metadata carries, and how the loop stops a run: --train.max_time, and SIGUSR1 (SLURM's warning before its time
# limit: checkpoint after the step, requeue the job, return); and the report each run draws at its end
STATEMENTS = [
    (TRAINING, ["run_args = ...", "out_of_time = ...", "if out_of_time: ...", "stop_signal = ...", "stop = ...",
                "if step % ckpt.interval == 0 or last_step or out_of_time or stop", "if stop: ...",
                "write_run_report(...)"]),
]


def pieces(script: str) -> dict[str, str]:
    """Each top-level function, class, method (as Class.method) and constant of a script: its source text, decorators
    included; a statement of any function (as `name = ...`, `if test: ...` or `call(...)`) the same way, dedented,
    and an if's condition alone (as `if test`)."""
    source = (ROOT / script).read_text()
    lines = source.splitlines()
    found = {}

    def text(node) -> str:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return textwrap.dedent("\n".join(lines[first - 1:node.end_lineno]))

    module = ast.parse(source)
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = text(node)
        if isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{item.name}": text(item) for item in node.body
                          if isinstance(item, ast.FunctionDef)})
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = text(node)
    for function in (n for n in module.body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(function):
            if isinstance(node, ast.If):
                found.setdefault(f"if {ast.unparse(node.test)}: ...", text(node))
                found.setdefault(f"if {ast.unparse(node.test)}", ast.unparse(node.test))  # the condition alone
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                found.setdefault(f"{node.targets[0].id} = ...", text(node))
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):  # a call on its own, as `f(...)`
                found.setdefault(f"{ast.unparse(node.value.func)}(...)", text(node))
    return found


@pytest.mark.parametrize("scripts,names", COPIES + STATEMENTS,
                         ids=["finetune", "micro_batches", "chunks", "training", "supervised", "alignment", "sampling",
                              "stopping"])
def test_deliberate_copies_stay_identical(scripts, names):
    sources = {script: pieces(script) for script in scripts}
    first = scripts[0]
    for name in names:
        assert name in sources[first], f"{first} has no {name}"
        for script in scripts[1:]:
            assert sources[script].get(name) == sources[first][name], f"{name}: {script} differs from {first}"


@pytest.mark.parametrize("scripts,name", FIELDS, ids=["finetune", "chunks"])
def test_sibling_argument_classes_have_the_same_fields(scripts, name):
    def fields(script: str) -> list[str]:
        (cls,) = [n for n in ast.parse((ROOT / script).read_text()).body
                  if isinstance(n, ast.ClassDef) and n.name == name]
        return [f"{n.target.id}: {ast.unparse(n.annotation)}" for n in cls.body if isinstance(n, ast.AnnAssign)]

    assert all(fields(script) == fields(scripts[0]) for script in scripts[1:]), {s: fields(s) for s in scripts}


def test_the_piece_finder_sees_what_it_compares():
    """pieces() finds nested loop statements and decorated functions (a finder that found nothing would pass every
    comparison above)."""
    found = pieces("finetune_full.py")
    assert found["validate"].startswith("@torch.no_grad()\ndef validate(")
    assert found["if stop: ..."].startswith("if stop:\n    progress.close()")
    assert found["TrainArgs.__post_init__"].startswith("def __post_init__(self):")
