"""
The code of another commit (or of another checkout) beside the current code in this process, for bench.train
--baseline: its modules imported in isolation, so that its model keeps its own module globals, and its model built
through the API of its era.

    with checkout("d0bbca5") as directory:  # a commit (git archive into a temporary directory) or a directory
        model = Code(directory).build(flags)  # in train mode, on the CPU

Code.active() puts the checkout first on sys.path (the repository root leaves it), takes the current project
modules out of sys.modules (every top-level module or package of either checkout: model, attention, kernels and
kernels.*, reference, tiny_stories_data, ...) and puts the checkout's own in; on leaving it puts everything back.
Importing the checkout's model there imports its own attention and kernels; afterwards the current code imports as
usual, and each model's functions keep resolving names in their own modules. The checkout's custom operators are
registered under a namespace of their own (dat -> dat_baseline1), because torch.library keeps one operator per
name in a process: a second registration of a name would replace the current code's implementation as well.
"""

import contextlib
import functools
import importlib
import io
import itertools
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
THIS_PACKAGE = __name__.split(".")[0]  # bench: stays imported, whatever the checkout holds


class BaselineError(ValueError):
    """A baseline that names no code."""


@contextlib.contextmanager
def checkout(ref):
    """The directory of ref's code: ref itself when it is a directory, else the files of the commit ref of this
    repository, extracted into a temporary directory (removed on leaving). BaselineError when ref is neither."""
    if Path(ref).is_dir():
        yield Path(ref).resolve()
        return
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise BaselineError(f"{ref}: neither a directory nor a commit of {REPO}")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", found.stdout.strip()], capture_output=True,
                             check=True).stdout
    with tempfile.TemporaryDirectory(prefix="bench_baseline_") as directory:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(directory, filter="data")
        yield Path(directory)


def describe(ref):
    """ref as a commit (its short hash and subject) or as a directory, for the report."""
    if Path(ref).is_dir():
        return str(Path(ref).resolve())
    return subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s", ref], capture_output=True,
                          text=True).stdout.strip()[:100].rstrip()


def module_names(directory):
    """Top-level modules and packages of a checkout: its .py files and its folders holding .py files."""
    names = {p.stem for p in directory.glob("*.py")}
    names |= {p.parent.name for p in directory.glob("*/*.py")}
    return names - {THIS_PACKAGE}


def resolved(entry):
    return Path(entry or ".").resolve()


@contextlib.contextmanager
def operator_namespace(suffix):
    """Meanwhile torch.library.custom_op (and triton_op) register 'ns::name' as 'ns_<suffix>::name'; RuntimeError
    when an operator registered before was replaced all the same."""
    registry = torch._library.custom_ops.OPDEFS
    before = dict(registry)
    registrars = {name: getattr(torch.library, name) for name in ("custom_op", "triton_op")
                  if hasattr(torch.library, name)}

    def renaming(register):
        @functools.wraps(register)
        def renamed(name, *args, **kwargs):
            namespace, _, op = name.partition("::")
            return register(f"{namespace}_{suffix}::{op}", *args, **kwargs)
        return renamed

    for name, register in registrars.items():
        setattr(torch.library, name, renaming(register))
    try:
        yield
    finally:
        for name, register in registrars.items():
            setattr(torch.library, name, register)
    replaced = sorted(name for name, op in before.items() if registry.get(name) is not op)
    if replaced:
        raise RuntimeError(f"the baseline's code replaced the custom operators {replaced} of the current code")


class Code:
    """The modules of one checkout, imported on first use inside active()."""

    count = itertools.count(1)

    def __init__(self, directory):
        self.directory = Path(directory).resolve()
        if not (self.directory / "model.py").is_file():
            raise BaselineError(f"{directory}: no model.py there")
        self.names = module_names(self.directory) | module_names(REPO)
        self.modules = {}  # name -> module, the checkout's
        self.suffix = f"baseline{next(self.count)}"

    def own(self, name):
        return name.split(".")[0] in self.names

    @contextlib.contextmanager
    def active(self):
        """sys.path and sys.modules as if the checkout were the repository, restored on leaving."""
        current = {name: sys.modules.pop(name) for name in list(sys.modules) if self.own(name)}
        path = sys.path[:]
        sys.path[:] = [str(self.directory)] + [p for p in path if resolved(p) not in (REPO, self.directory)]
        sys.modules.update(self.modules)
        importlib.invalidate_caches()
        try:
            with operator_namespace(self.suffix):
                yield
        finally:
            self.modules = {name: sys.modules.pop(name) for name in list(sys.modules) if self.own(name)}
            sys.path[:] = path
            sys.modules.update(current)

    def build(self, flags):
        """The checkout's model for train.py's flags (a dict), in train mode: (kind, args) =
        model_args_from_flags(flags), then from_reference(kind, args), from reference.py where it has them (later
        commits) or from model.py (earlier ones)."""
        with self.active():
            modules = [importlib.import_module(name) for name in ("reference", "model")
                       if (self.directory / f"{name}.py").is_file()]
            api = next(m for m in modules if hasattr(m, "from_reference") and hasattr(m, "model_args_from_flags"))
            kind, args = api.model_args_from_flags(flags)
            return api.from_reference(kind, args).train()
