"""The docs' links and the code a user copies from them: every link between the docs resolves,
every python block parses and names real things, the listed defaults are the constructors', and
the blocks that need no extra package or process group run on a CPU."""

import ast
import inspect
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md")


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of each fenced block of a markdown text."""
    found = re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
    return [(m[1], m[2], text.count("\n", 0, m.start()) + 1) for m in found]


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped (not
    ``_`` or ``-``), spaces to ``-``, ``-1``, ``-2``, ... on repeats; ``#`` lines in code blocks
    are no headings."""
    text = path.read_text()
    for _, code, _ in fenced_blocks(text):
        text = text.replace(code, "")
    anchors, seen = set(), {}
    for title in re.findall(r"^#{1,6} +(.+?) *$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_link_between_the_docs_resolves():
    """Each ``[text](target)`` and each ``name.md#anchor`` the docs cite (README.md:
    ``docs/kernels.md#limits``) names a file that exists and, with an anchor, a heading in it."""
    broken = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"\]\(([^)\s]+)\)|((?:[\w.-]+/)*[\w.-]+\.md#[\w-]+)", text):
            target = m[1] or m[2]
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked here
            name, _, anchor = target.partition("#")
            # a link is relative to its file (GitHub's rule); a path in prose may be from the root
            dest = next((p for p in (doc.parent / name, ROOT / name) if p.exists()), None) if name else doc
            where = f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {target}"
            if dest is None or (anchor and anchor not in heading_anchors(dest)):
                broken.append(where)
    assert not broken, broken


def python_blocks() -> list[tuple[str, int, str]]:
    """``(file, index, code)`` of every ```python block of the docs."""
    blocks = []
    for doc in DOCS:
        code = [c for lang, c, _ in fenced_blocks(doc.read_text()) if lang == "python"]
        blocks += [(doc.relative_to(ROOT).as_posix(), i, c) for i, c in enumerate(code)]
    return blocks


def optimizer_options(tree: ast.AST) -> list[tuple[str, str]]:
    """``(optimizer, option)`` for each option a snippet gives Adapprox or AdaMeM: the keywords of
    ``Adapprox(...)``, those that ``ZeroRedundancyOptimizer(..., optimizer_class=Adapprox)``
    passes on, and the keys of the Trainer's ``(Adapprox, {"lr": ...})``."""
    import torch.distributed.optim

    zero_own = inspect.signature(torch.distributed.optim.ZeroRedundancyOptimizer).parameters
    names = {"Adapprox", "AdaMeM"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in names:
            found += [(node.func.id, k.arg) for k in node.keywords if k.arg]
        elif isinstance(node, ast.Call):
            cls = next((k.value.id for k in node.keywords if k.arg == "optimizer_class"), None)
            if cls in names:
                found += [(cls, k.arg) for k in node.keywords if k.arg and k.arg not in zero_own]
        elif isinstance(node, ast.Tuple) and len(node.elts) == 2 and getattr(node.elts[0], "id", None) in names:
            if isinstance(node.elts[1], ast.Dict):
                found += [(node.elts[0].id, ast.literal_eval(k)) for k in node.elts[1].keys]
    return found


def test_the_docs_python_names_exist():
    """Every ``python`` block parses, what it imports from the package exists, and every option it
    (or an inline ``Adapprox(..., x=...)`` of the prose) gives an optimizer is one of its
    constructor's arguments."""
    import importlib

    import adapprox_kernels

    trees = [(f"{f}#{i}", ast.parse(code)) for f, i, code in python_blocks()]
    for doc in DOCS:
        for span in re.findall(r"`((?:Adapprox|AdaMeM)\([^`]*\))`", doc.read_text()):
            trees.append((f"{doc.name}: {span}", ast.parse(span.replace("…", "..."))))
    wrong, checked = [], 0
    for where, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("adapprox_kernels"):
                module = importlib.import_module(node.module)
                wrong += [f"{where}: {node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)]
        for cls, option in optimizer_options(tree):
            checked += 1
            if option not in inspect.signature(getattr(adapprox_kernels, cls)).parameters:
                wrong.append(f"{where}: {cls}({option}=)")
    assert not wrong, wrong
    assert checked > 20  # the blocks and spans were found


@pytest.mark.parametrize("doc, cls", [("docs/adamem.md", "AdaMeM"), ("docs/algorithm.md", "Adapprox")])
def test_the_defaults_the_docs_list_are_the_constructors(doc, cls):
    """docs/adamem.md's constructor block and algorithm.md's "Defaults are the paper's: ..."
    give each option's default as the signature does (``k_init=k_max``: None, which means it)."""
    import adapprox_kernels

    text = (ROOT / doc).read_text()
    if cls == "AdaMeM":
        (code,) = [c for _, c, _ in fenced_blocks(text) if c.startswith("AdaMeM(params")]
        listed = {k.arg: ast.literal_eval(k.value) for k in ast.parse(code).body[0].value.keywords}
    else:
        sentence = re.search(r"Defaults are the paper's:(.*?)is ours", text, re.S)[1]
        listed = dict(re.findall(r"`(\w+)=([^`]+)`", sentence))
        listed = {k: None if v == "k_max" else ast.literal_eval(v) for k, v in listed.items()}
    params = inspect.signature(getattr(adapprox_kernels, cls)).parameters
    assert {k: params[k].default if k in params else "not an argument" for k in listed} == listed
    if cls == "AdaMeM":  # the block is the whole signature, in its order
        assert list(listed) == [p for p in params if p != "params"]


def api_table(cls: str) -> list[list[str]]:
    """The cells of each row of the argument table in docs/api.md's ``## cls`` section."""
    text = (ROOT / "docs" / "api.md").read_text()
    section = re.search(rf"^## {cls}\n(.*?)(?=^## |\Z)", text, re.S | re.M)[1]
    rows = [[cell.strip() for cell in row.split("|")] for row in re.findall(r"^\|(.*)\|$", section, re.M)]
    assert rows[0] == ["argument", "default", "valid values", "meaning", "see"], rows[0]
    return rows[2:]  # past the header and its rule


def written_defaults(cls: type) -> list[tuple[str, str]]:
    """``(argument, default)`` of ``cls.__init__`` in order, each default as its source writes it
    (``1e-3``, where ``repr`` gives ``0.001``)."""
    source = textwrap.dedent(inspect.getsource(cls.__init__))
    args = ast.parse(source).body[0].args
    named = args.args[len(args.args) - len(args.defaults) :]
    return [(a.arg, ast.get_source_segment(source, d)) for a, d in zip(named, args.defaults)]


@pytest.mark.parametrize("cls", ["Adapprox", "AdaMeM"])
def test_the_api_page_lists_every_argument_with_its_default(cls):
    """docs/api.md's table has a row per constructor argument but ``params``, in the signature's
    order, none for an argument that does not exist, and each default as the signature writes
    it, in backticks."""
    import adapprox_kernels

    optimizer = getattr(adapprox_kernels, cls)
    rows = api_table(cls)
    assert all(len(row) == 5 for row in rows), [row for row in rows if len(row) != 5]  # a '|' in a cell
    written = written_defaults(optimizer)
    assert [name for name, _ in written] == list(inspect.signature(optimizer.__init__).parameters)[2:]
    assert [(row[0], row[1]) for row in rows] == [(f"`{name}`", f"`{default}`") for name, default in written]


def test_the_api_page_names_every_public_name():
    """Each name of ``adapprox_kernels.__all__`` starts a code span of docs/api.md."""
    import adapprox_kernels

    text = (ROOT / "docs" / "api.md").read_text()
    assert [name for name in adapprox_kernels.__all__ if not re.search(rf"`{re.escape(name)}[`(]", text)] == []


def _resolves(name: str, module, classes: list[type]) -> bool:
    """Does the dotted ``name`` of a cross-reference in ``module`` name something: from a module
    (``adapprox_kernels.srsi.truncate``, or ``.apply_update`` from the module's package), in
    ``module`` itself, or an attribute of one of ``classes`` (a bare method name: the module's
    classes, and the package's classes built on them, as a mixin's docstring names its host's
    methods)?"""
    import importlib

    if name.startswith("."):  # relative to the module's package: :mod:`.v_matmul` in kernels/
        name = module.__package__ + name
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
            return True
        except AttributeError:
            break
    owners = [module, *classes] if len(parts) == 1 else [module]
    for obj in owners:
        try:
            for part in parts:
                obj = getattr(obj, part)
            return True
        except AttributeError:
            continue
    return False


def test_every_docstring_cross_reference_resolves():
    """Each ``:meth:``, ``:func:``, ``:class:``, ``:data:``, ``:mod:`` or ``:attr:`` reference in
    the package's source names a thing that exists (one left behind by a rename or a move reads
    as if it did)."""
    import importlib
    import pkgutil

    import adapprox_kernels

    modules = [adapprox_kernels] + [
        importlib.import_module(m.name) for m in pkgutil.walk_packages(adapprox_kernels.__path__, "adapprox_kernels.")
    ]
    package_classes = {c for m in modules for _, c in inspect.getmembers(m, inspect.isclass)}
    unresolved = []
    for module in [m for m in modules if m.__file__.endswith(".py")]:  # not the extension's .so
        own = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
        classes = [c for c in package_classes if any(o in c.__mro__ for o in own)]
        source = Path(module.__file__).read_text()
        for match in re.finditer(r":(?:meth|func|class|data|mod|attr):`~?([\w.]+)`", source):
            if not _resolves(match[1], module, classes):
                unresolved.append(f"{module.__name__}:{source.count(chr(10), 0, match.start()) + 1}: {match[0]}")
    assert unresolved == []


# What each python block leaves to the reader, defined so that it runs on a CPU in seconds. None:
# not run here, it needs transformers or a process group (test_frameworks.py and
# test_distributed.py make the same calls).
PRELUDES = {
    ("README.md", 0): "loader = [(torch.randn(2, 5, 256), torch.randn(2, 4, 256))]\n"
    "compute_loss = lambda model, batch: model(*batch).square().mean()",
    ("README.md", 1): "from adapprox_kernels import Adapprox\nmodel = torch.nn.Linear(8, 4)",  # after the usage
    ("README.md", 2): None,
    ("docs/adamem.md", 0): "model = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Linear(40, 3))\n"
    "loader = [(torch.randn(4, 12), torch.randint(3, (4,)))] * 2\nloss_fn = torch.nn.functional.cross_entropy",
    ("docs/distributed.md", 0): None,
    ("docs/distributed.md", 1): None,
    ("docs/distributed.md", 2): None,
    ("docs/install.md", 0): "",
    ("docs/api.md", 0): "",
}


@pytest.mark.parametrize("doc, index, code", [pytest.param(*b, id=f"{b[0]}#{b[1]}") for b in python_blocks()])
def test_the_docs_python_blocks_run(doc, index, code, tmp_path, monkeypatch, capsys):
    """Each block runs as written, with only what it leaves to the reader (``loader``, ``model``)
    defined first; the README's usage prints the state report its comment describes."""
    prelude = PRELUDES[doc, index]  # a KeyError: a new block, say here how it runs
    if prelude is None:
        pytest.skip("needs transformers or a process group (see PRELUDES)")
    monkeypatch.chdir(tmp_path)  # the README saves opt.pt
    exec(compile(f"import torch\n{prelude}\n{code}", f"{doc}#{index}", "exec"), {"__name__": "docs"})
    if (doc, index) == ("README.md", 0):
        out = capsys.readouterr().out
        assert "rank" in out and "xi" in out and "% of AdamW)" in out, out[-500:]
        import torch

        assert torch.load("opt.pt", weights_only=True)["state"]
