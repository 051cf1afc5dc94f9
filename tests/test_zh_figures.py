"""Chinese figures (issue 29, item 7): every figure has a Chinese twin, drawn from one
catalogue of strings with a CJK font, and the Chinese pages show only the twins.

The twins are made by ``tools/execute_notebooks.py`` (notebook outputs, in the same run
as the English images) and ``tools/figure_i18n.py static`` (the bench figures); see
``tools/figure_i18n.py``. When a test here fails after a chapter changed, run
``python tools/execute_notebooks.py --zh-figures-only book/<chapter>.ipynb``.
"""

import base64
import hashlib
import importlib.util
import json
import re
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "figure_i18n", ROOT / "tools" / "figure_i18n.py"
)
figure_i18n = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("figure_i18n", figure_i18n)
_spec.loader.exec_module(figure_i18n)

ZH = ROOT / "book" / "_figures_zh"
MANIFEST = json.loads((ZH / "manifest.json").read_text(encoding="utf-8"))
CATALOGUE = json.loads(figure_i18n.CATALOGUE.read_text(encoding="utf-8"))
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))
STATIC = sorted(
    p
    for d in figure_i18n.STATIC_DIRS
    for p in (ROOT / d).glob("*.png")
    if not p.name.endswith(".zh_CN.png")
)
PNG = b"\x89PNG\r\n\x1a\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png_outputs(path: Path):
    """(cell id, output index, PNG bytes) of every PNG output of a notebook."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for index, output in enumerate(cell.get("outputs", [])):
            data = output.get("data", {})
            if "image/png" in data:
                yield cell.get("id"), index, base64.b64decode(data["image/png"])


def english_pngs() -> set[str]:
    found = {sha(png) for p in NOTEBOOKS for _, _, png in png_outputs(p)}
    return found | {sha(p.read_bytes()) for p in STATIC}


def chinese_pngs() -> set[str]:
    return {sha(p.read_bytes()) for p in ZH.rglob("*.png")} | {
        sha(p.with_name(p.stem + ".zh_CN.png").read_bytes())
        for p in STATIC
        if p.with_name(p.stem + ".zh_CN.png").exists()
    }


# --------------------------------------------------------------------- the mechanism


def test_matplotlib_finds_the_cjk_font():
    path = figure_i18n.cjk_font_path()
    assert Path(path).is_file() and "CJK" in Path(path).name, path


def test_a_chinese_figure_has_every_glyph(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    translator = figure_i18n.Translator(
        {"strings": {"sequence length n": "序列长度 n", "time": "时间（毫秒）"}}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font(s)" fails
        fig, ax = plt.subplots()
        ax.plot([1, 2], label="time")
        ax.set_xlabel("sequence length n")
        ax.legend()
        with figure_i18n.chinese(fig, translator):
            fig.savefig(tmp_path / "zh.png")
            assert ax.get_xlabel() == "序列长度 n"
            assert ax.get_legend().get_texts()[0].get_text() == "时间（毫秒）"
        fig.savefig(tmp_path / "en.png")
        plt.close(fig)
    assert ax.get_xlabel() == "sequence length n", "the English figure was not restored"
    assert translator.used == {"sequence length n", "time"}


def test_translator_patterns_math_symbols_and_missing():
    t = figure_i18n.Translator(
        {
            "strings": {"recompute": "重新计算"},
            "patterns": {"{way} ({ms} ms/token)": "{way}（每个词元 {ms} ms）"},
            "keep": ["SDPA"],
        }
    )
    assert t("recompute (0.52 ms/token)") == "重新计算（每个词元 0.52 ms）"
    assert t("SDPA") == "SDPA"
    assert t("$\\sqrt{d}$") == "$\\sqrt{d}$" and t("n") == "n" and t("H_kv") == "H_kv"
    assert t("1,024") == "1,024"
    assert t("cached (0.1 ms/token)") == "cached（每个词元 0.1 ms）"
    assert t.missing == {"cached"}
    assert t.used == {"recompute", "{way} ({ms} ms/token)", "SDPA"}
    with pytest.raises(ValueError, match="placeholders"):
        figure_i18n.Translator({"patterns": {"{a} x": "{b} 乘"}})


def test_the_kernel_draws_a_twin_and_leaves_the_english_output_alone(tmp_path):
    """The hook as tools/execute_notebooks.py loads it: one PNG output, unchanged,
    nothing printed into the notebook, and a Chinese twin recorded with what it used
    and missed (math mixed with Chinese included)."""
    from nbclient import NotebookClient

    catalogue = tmp_path / "strings.json"
    catalogue.write_text(
        json.dumps({"strings": {"running maximum $m$": "当前的最大值 $m$"}}),
        encoding="utf-8",
    )
    source = (
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(figsize=(2, 1.5))\n"
        "ax.plot([1, 2], label='running maximum $m$')\n"
        "ax.set_title('not in the catalogue')\n"
        "ax.legend()\n"
        "plt.show()"
    )

    def run(hook: bool):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(source)]
        env = dict(
            __import__("os").environ,
            PYTHONPATH=str(ROOT / "tools"),
            BOOK_FIGURE_ZH_DIR=str(tmp_path / "zh"),
            BOOK_FIGURE_STRINGS=str(catalogue),
        )
        arguments = ["--IPKernelApp.extensions=figure_i18n"] if hook else []
        client = NotebookClient(
            nb, timeout=120, kernel_name="python3", extra_arguments=arguments
        )
        client.execute(env=env)
        return nb.cells[0].outputs

    with_hook, without = run(True), run(False)
    assert [o.output_type for o in with_hook] == ["display_data"], with_hook
    assert with_hook[0]["data"]["image/png"] == without[0]["data"]["image/png"]
    (record,) = [
        json.loads(line)
        for line in (tmp_path / "zh" / "records.jsonl").read_text().splitlines()
    ]
    assert "error" not in record, record
    assert record["used"] == ["running maximum $m$"]
    assert record["missing"] == ["not in the catalogue"]
    english = base64.b64decode(with_hook[0]["data"]["image/png"])
    assert record["en_sha256"] == sha(english)
    twin = (tmp_path / "zh" / f"{record['key']}.png").read_bytes()
    assert twin.startswith(PNG) and twin != english


# --------------------------------------------------------------------- the twins


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_png_output_has_a_chinese_twin(path):
    name = path.relative_to(ROOT).as_posix()
    entries = MANIFEST["notebooks"].get(name, {})
    outputs = {f"{cell}-{index}": png for cell, index, png in png_outputs(path)}
    stale = [k for k in outputs if k not in entries]
    assert not stale, f"{name}: outputs with no Chinese twin: {stale}"
    for key, png in outputs.items():
        assert entries[key]["en_sha256"] == sha(png), (
            f"{name} {key}: the English figure changed after its twin was drawn"
        )
        twin = ZH / path.stem / f"{key}.png"
        assert twin.read_bytes().startswith(PNG), twin
        assert entries[key]["strings_sha256"] == figure_i18n.strings_digest(
            entries[key]["used"], CATALOGUE
        ), f"{name} {key}: a string it uses was edited in the catalogue since"
    extra = sorted(set(entries) - set(outputs))
    assert not extra, (
        f"{name}: twins of outputs (cell id-index) that do not exist: {extra}"
    )
    on_disk = {p.stem for p in (ZH / path.stem).glob("*.png")}
    assert on_disk == set(entries), f"{name}: stray files {on_disk ^ set(entries)}"


def test_no_twins_of_notebooks_that_are_gone():
    folders = {p.name for p in ZH.iterdir() if p.is_dir()}
    listed = {Path(n).stem for n in MANIFEST["notebooks"]}
    assert folders == listed
    assert all((ROOT / n).exists() for n in MANIFEST["notebooks"])


@pytest.mark.parametrize("path", STATIC, ids=lambda p: p.stem)
def test_every_static_figure_has_a_chinese_twin(path):
    rel = path.relative_to(ROOT).as_posix()
    twin = path.with_name(path.stem + ".zh_CN.png")
    assert twin.read_bytes().startswith(PNG), f"{rel}: no {twin.name}"
    entry = MANIFEST["static"][rel]
    assert entry["en_sha256"] == sha(path.read_bytes()), (
        f"{rel} was drawn again after its twin: python tools/figure_i18n.py static"
    )
    assert entry["strings_sha256"] == figure_i18n.strings_digest(
        entry["used"], CATALOGUE
    ), f"{rel}: a string it uses was edited in the catalogue since"


def test_a_twin_equals_its_english_image_only_when_the_figure_has_no_words():
    same = english_pngs() & chinese_pngs()
    wordless = {
        entry["en_sha256"]
        for _, entries in _entries()
        for entry in entries.values()
        if not entry["used"]
    }
    assert same <= wordless, f"Chinese twins identical to an English image: {same}"


# --------------------------------------------------------------------- the catalogue


def _entries():
    yield from MANIFEST["notebooks"].items()
    yield "static", MANIFEST["static"]


def test_no_figure_string_is_missing():
    missing = {
        f"{where} {key}": entry["missing"]
        for where, entries in _entries()
        for key, entry in entries.items()
        if entry["missing"]
    }
    assert not missing, f"add to {figure_i18n.CATALOGUE.name}: {missing}"


def test_the_catalogue_has_no_unused_entry():
    used = {u for _, entries in _entries() for e in entries.values() for u in e["used"]}
    defined = (
        set(CATALOGUE.get("strings", {}))
        | set(CATALOGUE.get("patterns", {}))
        | set(CATALOGUE.get("keep", []))
    )
    assert not defined - used, f"unused catalogue entries: {sorted(defined - used)}"
    assert used <= defined


FORBIDDEN = [
    "本书包",
    "块矩阵",
    r"(少|小)\S{0,12}倍",
    "按倍数",
    "一致到",
    "滑动的最大值",
    "批次",
    "笔记本",
    "键/值缓存",
]


def test_catalogue_follows_the_translators_rules():
    values = list(CATALOGUE.get("strings", {}).values()) + list(
        CATALOGUE.get("patterns", {}).values()
    )
    bad = [(v, p) for v in values for p in FORBIDDEN if re.search(p, v)]
    assert not bad, bad
    # Chinese text in full-width brackets (half-width ones hold code or numbers);
    # no space before %.
    cjk_in_half_width = r"\([^()]*[\u4e00-\u9fff][^()]*\)"
    assert not [v for v in values if re.search(cjk_in_half_width + r"|\s%", v)]
    for english, chinese in CATALOGUE.get("strings", {}).items():
        assert re.search(r"[\u4e00-\u9fff]", chinese), (english, chinese)


# --------------------------------------------------------------------- the site


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs).get("src", ""))


def _page_images(page: Path) -> list[Path]:
    parser = _Images()
    parser.feed(page.read_text(encoding="utf-8"))
    return [
        (page.parent / src.split("#")[0].split("?")[0]).resolve()
        for src in parser.sources
        # the book's figures (Sphinx copies them to _images/; _static holds the
        # theme's icons)
        if src.endswith(".png") and "://" not in src and "_images/" in src
    ]


def test_chinese_pages_show_only_chinese_figures(site):
    zh = site / "zh"
    english, chinese = english_pngs(), chinese_pngs()
    shown = 0
    for page in sorted(zh.rglob("*.html")):
        if "_static" in page.parts or "_sources" in page.parts:
            continue
        for image in _page_images(page):
            digest = sha(image.read_bytes())
            where = f"{page.relative_to(site)}: {image.name}"
            # (a twin of a figure with no words, the digits' titles "0".."9" say, is
            # the English image byte for byte: it is in both sets)
            assert digest in chinese, f"{where} is not a Chinese twin"
            assert digest not in english - chinese, f"{where} is an English figure"
            shown += 1
    assert shown >= len(chinese) // 2, shown


def test_english_pages_show_no_chinese_figure(site):
    chinese = chinese_pngs()
    for page in sorted(site.glob("*.html")):
        for image in _page_images(page):
            assert sha(image.read_bytes()) not in chinese, f"{page.name}: {image.name}"
