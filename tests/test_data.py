"""Tests for fixtures.data: loaders on the real mirror, fail-closed errors on broken copies, the hub path.

The mirror tests pin row counts and sha256 values from the mirror's PROVENANCE.md files, so a swapped or
truncated data file fails here before it can move a benchmark score.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures import data, data_hub
from fixtures.data import (
    BBQ_CATEGORIES,
    CALIBRATION_POOLS,
    DATA_DIR_ENV,
    GENERAL_POOL,
    SAFETY_POOLS,
    DataSource,
    LoadedDataset,
)
from fixtures.errors import DataError
from fixtures.hashing import sha256_file, sha256_json

MIRROR_BBQ = {  # PROVENANCE.md: rows and sha256 of the 7 categories present
    "Age": (3680, "46e805b3fc2d8cbd26eeb8e8430d98cf7b2dc9c83574ff3674e8ce4f0fca2a60"),
    "Disability_status": (1556, "375d40d9b71f056150264445ec189b13934998f3f49a1e311aa7578eb3b45e5f"),
    "Gender_identity": (5672, "8b5adbb368510a97d5775dc43e1c719e0249fe2da33f13c83e3e29edafec7a00"),
    "Nationality": (3080, "a583e74666aec0341ded8aa3983e7cad694eb24de72c254d28b2df3035720090"),
    "Physical_appearance": (1576, "e48d7e13508565f4801574e611043470c25c95a0a62af3699cb5ee7cb02608fb"),
    "Religion": (1200, "cb9555f9f3454a52cd2df85956b59bd7fcca5aa922c8527693b1164d08417616"),
    "Sexual_orientation": (864, "2c71036b9e7584fe589c42aef32c1a42bc01b9a5e9b1b8704342630cdb08cefd"),
}

Loader = Callable[[DataSource], LoadedDataset]

# (loader, rows, file relative to the mirror, PROVENANCE sha256)
SINGLE_FILE_CASES: list[tuple[str, Loader, int, str, str]] = [
    (
        "crows_revised",
        data.load_crows_pairs,
        1677,
        "crows_pairs/crows_pairs_english_lmeval.jsonl",
        "39cc6f4aedd60a92b33a834f84445e65cffe91e78bd57be474b5bc15249c892e",
    ),
    (
        "crows_original",
        lambda s: data.load_crows_pairs(s, "original"),
        1508,
        "crows_pairs/crows_pairs_anonymized.csv",
        "dfb36986ce0502abbaf7055b9176da3d08d48e07df1251991b5dfbcbceab9d0c",
    ),
    (
        "stereoset",
        data.load_stereoset,
        2106,
        "stereoset/stereoset_dev_clusters.jsonl",
        "e62be5dfc5f9fdccba5785ff5d9bca355a76bd27e182320568240e84d5c412af",
    ),
    (
        "xstest",
        data.load_xstest,
        450,
        "xstest/xstest_prompts.csv",
        "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
    ),
    (
        "xstest_completions",
        data.load_xstest_labeled_completions,
        450,
        "xstest/completions_labeled/xstest_v2_completions_llama2orig_gpteval.csv",
        "a918c4d0c7355da5c80ce73dd7bc79b20422148b265851afe1e53c08e472ce48",
    ),
    (
        "advbench",
        data.load_advbench,
        520,
        "advbench/harmful_behaviors.csv",
        "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1",
    ),
    (
        "calibration_general",
        lambda s: data.load_calibration_pool(s, "general"),
        3742,
        "calibration/general_dolly_open_qa.jsonl",
        "d265bcc419f30a3acb59e5b7d61cc369deb795b204f419506fcef446b5428731",
    ),
    (
        "calibration_stl",
        lambda s: data.load_calibration_pool(s, "safety_tuned_llamas"),
        2483,
        "calibration/safety_safety_tuned_llamas.jsonl",
        "a586fddaf834db3f9ecea1650ecee1fa6791ef3306235ac3ac0bf48ba703a0dc",
    ),
    (
        "calibration_coconot",
        lambda s: data.load_calibration_pool(s, "coconot_contrast"),
        927,
        "calibration/safety_coconot_contrast_pref_chosen.jsonl",
        "6d10de6e7ec79470736a411bfbffd4eebb7e84ec4a94212139f4471297e5a3af",
    ),
    (
        "calibration_hh",
        lambda s: data.load_calibration_pool(s, "hh_rlhf_harmless"),
        2300,
        "calibration/safety_hh_rlhf_harmless_base_test.jsonl",
        "f6c81fe69805b502548b0a6f126bb6437a4449f425b60f3db7b37a4bff421c89",
    ),
]


@pytest.fixture(scope="module")
def mirror(shared_data_dir: Path) -> DataSource:
    return DataSource.from_setting(str(shared_data_dir))


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    """Hub tests fake `datasets.load_dataset`; their results must not leak into other tests through the cache.

    Only the hub cache is dropped, so the mirror files are parsed once per session, not once per hub test.
    """
    data._load_hub.cache_clear()
    yield
    data._load_hub.cache_clear()


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _copy(mirror_dir: Path, tmp: Path, rel: str) -> Path:
    dest = tmp / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mirror_dir / rel, dest)
    return dest


def _first_lines(path: Path, n: int) -> list[str]:
    with path.open(encoding="utf-8") as handle:
        return [next(handle) for _ in range(n)]


# --- the real mirror ------------------------------------------------------------------------------


@pytest.mark.parametrize(("loader", "rows", "rel", "sha"), [c[1:] for c in SINGLE_FILE_CASES],
                         ids=[c[0] for c in SINGLE_FILE_CASES])
def test_single_file_loaders_match_provenance(
    mirror: DataSource, shared_data_dir: Path, loader: Loader, rows: int, rel: str, sha: str
) -> None:
    ds = loader(mirror)
    assert len(ds) == rows
    assert ds.files == ((shared_data_dir / rel).resolve(),)
    assert ds.sha256 == sha == sha256_file(shared_data_dir / rel)
    assert ds.source == f"local:{shared_data_dir.resolve()}"
    again = loader(mirror)
    assert again is ds  # cached: the same object, not a copy
    assert hash(ds) == hash((ds.name, ds.source, ds.sha256))  # hashable although rows are dicts
    data.clear_cache()
    reread = loader(mirror)
    assert reread is not ds and reread.sha256 == ds.sha256 and reread.rows == ds.rows


def test_bbq_mirror(mirror: DataSource, shared_data_dir: Path) -> None:
    assert data.available_bbq_categories(mirror) == tuple(MIRROR_BBQ)
    ds = data.load_bbq(mirror)
    assert ds.name == "bbq" and len(ds) == 17_628
    assert [f.name for f in ds.files] == [f"{c}.jsonl" for c in MIRROR_BBQ]
    for path in ds.files:
        assert sha256_file(path) == MIRROR_BBQ[path.stem][1]
    assert collections.Counter(r["category"] for r in ds.rows) == {c: n for c, (n, _) in MIRROR_BBQ.items()}
    ranks = [BBQ_CATEGORIES.index(r["category"]) for r in ds.rows]
    assert ranks == sorted(ranks)
    # Rows are exactly the file's objects, in file order.
    first = [json.loads(line) for line in _first_lines(shared_data_dir / "bbq" / "Age.jsonl", 3)]
    assert list(ds.rows[:3]) == first
    assert data.load_bbq(mirror) is ds
    assert data.load_bbq(mirror, list(MIRROR_BBQ)) is ds  # same categories, same cache entry
    assert data.load_bbq(mirror).sha256 == ds.sha256


def test_bbq_subset_is_canonical_order(mirror: DataSource) -> None:
    ds = data.load_bbq(mirror, ["Religion", "Age", "Religion"])
    assert [f.stem for f in ds.files] == ["Age", "Religion"]
    assert len(ds) == 3680 + 1200
    assert ds.sha256 != MIRROR_BBQ["Age"][1]  # several files: a combined digest


def test_bbq_missing_or_unknown_category(mirror: DataSource) -> None:
    with pytest.raises(DataError, match=r"Race_ethnicity\.jsonl"):
        data.load_bbq(mirror, ["Age", "Race_ethnicity"])
    with pytest.raises(DataError, match="Klingon"):
        data.load_bbq(mirror, ["Klingon"])
    with pytest.raises(DataError):
        data.load_bbq(mirror, [])


def test_bbq_rows_work_with_lm_eval(mirror: DataSource) -> None:
    datasets = pytest.importorskip("datasets")
    bbq_utils = pytest.importorskip("lm_eval.tasks.bbq.utils")
    ds = data.load_bbq(mirror)
    sample = list(ds.rows[::97])
    processed = bbq_utils.process_docs(datasets.Dataset.from_list(sample))
    assert len(processed) == len(sample)
    assert sum(1 for doc in processed if len(doc["biased_answers"]) == 1) >= 0.95 * len(sample)
    assert "biased_answers" not in ds.rows[0]  # lm-eval worked on copies; the cached rows are untouched


def test_crows_rows_work_with_lm_eval(mirror: DataSource) -> None:
    crows_utils = pytest.importorskip("lm_eval.tasks.crows_pairs.utils")
    ds = data.load_crows_pairs(mirror)
    assert crows_utils.doc_to_choice(ds.rows[0]) == [ds.rows[0]["sent_more"], ds.rows[0]["sent_less"]]
    assert collections.Counter(r["bias_type"] for r in ds.rows)["autre"] == 11


def test_xstest_labels(mirror: DataSource) -> None:
    ds = data.load_xstest(mirror)
    assert collections.Counter(r["label"] for r in ds.rows) == {"safe": 250, "unsafe": 200}
    assert all((r["label"] == "unsafe") == r["type"].startswith("contrast_") for r in ds.rows)
    completions = data.load_xstest_labeled_completions(mirror)
    labels = collections.Counter(r["final_label"] for r in completions.rows)
    assert labels == {"2_full_refusal": 294, "1_full_compliance": 101, "3_partial_refusal": 55}


def test_stereoset_intrasentence_only(mirror: DataSource) -> None:
    ds = data.load_stereoset(mirror)
    assert {r["task"] for r in ds.rows} == {"intrasentence"}
    assert all("BLANK" in r["context"] for r in ds.rows)
    counts = collections.Counter(r["bias_type"] for r in ds.rows)
    assert counts == {"race": 962, "profession": 810, "gender": 255, "religion": 79}


def test_advbench_columns(mirror: DataSource) -> None:
    ds = data.load_advbench(mirror)
    assert set(ds.rows[0]) == {"goal", "target"}
    assert all(r["target"].startswith("Sure, here") for r in ds.rows)


def test_calibration_pools(mirror: DataSource) -> None:
    assert GENERAL_POOL in CALIBRATION_POOLS
    assert set(SAFETY_POOLS) | {GENERAL_POOL} == set(CALIBRATION_POOLS)
    assert GENERAL_POOL not in SAFETY_POOLS
    for pool in CALIBRATION_POOLS:
        ds = data.load_calibration_pool(mirror, pool)
        assert ds.name == f"calibration/{pool}"
        assert len({r["id"] for r in ds.rows}) == len(ds)
        assert all(r["messages"][0]["role"] == "user" for r in ds.rows)
    with pytest.raises(DataError, match="hh_rlhf_harmless"):
        data.load_calibration_pool(mirror, "tulu3")


# --- DataSource -----------------------------------------------------------------------------------


def test_from_setting_explicit_env_and_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_data_dir: Path
) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert DataSource.from_setting(None) == DataSource(None)
    assert DataSource.from_setting("hub").data_dir is None
    assert DataSource.from_setting(str(tmp_path)).data_dir == tmp_path.resolve()
    monkeypatch.setenv(DATA_DIR_ENV, str(shared_data_dir))
    assert DataSource.from_setting(None).data_dir == shared_data_dir.resolve()
    assert DataSource.from_setting("").data_dir == shared_data_dir.resolve()
    assert DataSource.from_setting(str(tmp_path)).data_dir == tmp_path.resolve()  # CLI beats env
    assert DataSource.from_setting("hub").data_dir is None
    assert "Hub" in DataSource(None).describe()
    assert str(tmp_path) in DataSource(tmp_path).describe()


def test_from_setting_rejects_missing_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="nope"):
        DataSource.from_setting(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match=r"file\.txt"):
        DataSource.from_setting(str(tmp_path / "file.txt"))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=DATA_DIR_ENV):
        DataSource.from_setting(None)


# --- broken copies fail closed --------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    source = DataSource(tmp_path / "absent")
    with pytest.raises(DataError, match="absent"):
        data.load_xstest(source)
    with pytest.raises(DataError, match="absent"):
        data.load_bbq(source)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"advbench/harmful_behaviors\.csv"):
        data.load_advbench(DataSource(tmp_path))
    with pytest.raises(DataError, match="no BBQ files"):
        data.load_bbq(DataSource(tmp_path))
    assert data.available_bbq_categories(DataSource(tmp_path)) == ()


@pytest.mark.parametrize(
    ("rel", "content", "message"),
    [
        ("crows_pairs/crows_pairs_english_lmeval.jsonl", "", "no rows"),
        ("crows_pairs/crows_pairs_english_lmeval.jsonl", "\n\n", "no rows"),
        ("advbench/harmful_behaviors.csv", "", "empty file"),
        ("advbench/harmful_behaviors.csv", "goal,target\n", "no rows"),
    ],
    ids=["jsonl_zero_bytes", "jsonl_blank_lines", "csv_zero_bytes", "csv_header_only"],
)
def test_empty_files(tmp_path: Path, rel: str, content: str, message: str) -> None:
    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    path.write_text(content)
    loader = data.load_crows_pairs if rel.endswith(".jsonl") else data.load_advbench
    with pytest.raises(DataError, match=message) as info:
        loader(DataSource(tmp_path))
    assert path.name in str(info.value)


def test_bad_json_line_names_file_and_line(tmp_path: Path, shared_data_dir: Path) -> None:
    rel = "crows_pairs/crows_pairs_english_lmeval.jsonl"
    lines = _first_lines(shared_data_dir / rel, 4)
    lines[2] = lines[2][:40] + "\n"  # truncated object on line 3
    (tmp_path / "crows_pairs").mkdir()
    (tmp_path / rel).write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match="invalid JSON") as info:
        data.load_crows_pairs(DataSource(tmp_path))
    assert "crows_pairs_english_lmeval.jsonl, line 3" in str(info.value)


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "source": "s", "id": "1"}
    path = tmp_path / CALIBRATION_POOLS["general"]
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"source": "s", "id": "2"}) + "\n")
    expected = r"general_dolly_open_qa\.jsonl, line 3: missing field\(s\) \['messages'\]"
    with pytest.raises(DataError, match=expected):
        data.load_calibration_pool(DataSource(tmp_path), "general")


def test_missing_field_in_jsonl(tmp_path: Path, shared_data_dir: Path) -> None:
    rows = [json.loads(line) for line in _first_lines(shared_data_dir / "bbq" / "Religion.jsonl", 3)]
    del rows[1]["answer_info"]  # lm-eval's process_docs needs it
    _jsonl(tmp_path / "bbq" / "Religion.jsonl", rows)
    with pytest.raises(DataError, match=r"Religion\.jsonl, line 2: missing field\(s\) \['answer_info'\]"):
        data.load_bbq(DataSource(tmp_path))


def test_missing_column_in_csv(tmp_path: Path) -> None:
    path = tmp_path / "advbench" / "harmful_behaviors.csv"
    path.parent.mkdir(parents=True)
    path.write_text("goal,tgt\nDo harm,Sure\n")
    with pytest.raises(DataError, match=r"harmful_behaviors\.csv: missing column\(s\) \['target'\]"):
        data.load_advbench(DataSource(tmp_path))


def test_short_csv_row(tmp_path: Path) -> None:
    path = tmp_path / "advbench" / "harmful_behaviors.csv"
    path.parent.mkdir(parents=True)
    path.write_text("goal,target\nA,B\nC\n")
    with pytest.raises(DataError, match=r"harmful_behaviors\.csv, line 3"):
        data.load_advbench(DataSource(tmp_path))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("label", "1", "label"),
        ("context_condition", "vague", "context_condition"),
        ("category", "Age", "category"),
    ],
)
def test_bbq_field_checks(
    tmp_path: Path, shared_data_dir: Path, field: str, value: Any, message: str
) -> None:
    rows = [json.loads(line) for line in _first_lines(shared_data_dir / "bbq" / "Religion.jsonl", 2)]
    rows[1][field] = value
    _jsonl(tmp_path / "bbq" / "Religion.jsonl", rows)
    with pytest.raises(DataError, match=message) as info:
        data.load_bbq(DataSource(tmp_path), ["Religion"])
    assert "Religion.jsonl, line 2" in str(info.value)


def test_bad_values_in_other_datasets(tmp_path: Path, shared_data_dir: Path) -> None:
    path = _copy(shared_data_dir, tmp_path, "xstest/xstest_prompts.csv")
    path.write_text(path.read_text(encoding="utf-8").replace(",homonyms,safe,", ",homonyms,harmless,", 1))
    with pytest.raises(DataError, match=r"xstest_prompts\.csv, line 2: label must be one of"):
        data.load_xstest(DataSource(tmp_path))
    bad_turns = {"messages": [{"role": "assistant", "content": "a"}], "source": "s", "id": "1"}
    _jsonl(tmp_path / CALIBRATION_POOLS["hh_rlhf_harmless"], [bad_turns])
    with pytest.raises(DataError, match="roles must alternate"):
        data.load_calibration_pool(DataSource(tmp_path), "hh_rlhf_harmless")
    cluster = json.loads(_first_lines(shared_data_dir / "stereoset" / "stereoset_dev_clusters.jsonl", 1)[0])
    cluster["sentences"] = cluster["sentences"][:2]
    _jsonl(tmp_path / "stereoset" / "stereoset_dev_clusters.jsonl", [cluster])
    with pytest.raises(DataError, match="gold_label"):
        data.load_stereoset(DataSource(tmp_path))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "advbench" / "harmful_behaviors.csv"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"goal,target\n\xff\xfe,x\n")
    with pytest.raises(DataError, match="UTF-8"):
        data.load_advbench(DataSource(tmp_path))


def test_stereoset_without_intrasentence(tmp_path: Path, shared_data_dir: Path) -> None:
    first = _first_lines(shared_data_dir / "stereoset" / "stereoset_dev_clusters.jsonl", 2)
    rows = [json.loads(line) for line in first]
    assert {r["task"] for r in rows} == {"intersentence"}
    _jsonl(tmp_path / "stereoset" / "stereoset_dev_clusters.jsonl", rows)
    with pytest.raises(DataError, match="no intrasentence"):
        data.load_stereoset(DataSource(tmp_path))


def test_partial_bbq_mirror_and_sha(tmp_path: Path, shared_data_dir: Path) -> None:
    _copy(shared_data_dir, tmp_path, "bbq/Sexual_orientation.jsonl")
    _copy(shared_data_dir, tmp_path, "bbq/Religion.jsonl")
    source = DataSource(tmp_path)
    assert data.available_bbq_categories(source) == ("Religion", "Sexual_orientation")
    ds = data.load_bbq(source)
    assert len(ds) == 1200 + 864
    mirror_subset = data.load_bbq(DataSource(shared_data_dir), ["Sexual_orientation", "Religion"])
    assert ds.sha256 == mirror_subset.sha256  # depends on names and bytes, not on where the mirror lives
    assert ds.rows == mirror_subset.rows


# --- hub path -------------------------------------------------------------------------------------


HUB_LOADERS: dict[str, Loader] = {
    "bbq": data.load_bbq,
    "crows_pairs": data.load_crows_pairs,
    "crows_pairs_original": lambda s: data.load_crows_pairs(s, "original"),
    "stereoset": data.load_stereoset,
    "xstest": data.load_xstest,
    "xstest_labeled_completions": data.load_xstest_labeled_completions,
    "advbench": data.load_advbench,
    **{f"calibration/{p}": (lambda s, p=p: data.load_calibration_pool(s, p)) for p in CALIBRATION_POOLS},
    **{f"refusal_labels/{n}": (lambda s, n=n: data.load_refusal_labels(s, n)) for n in data.REFUSAL_LABEL_SOURCES},
}


def test_every_dataset_has_a_hub_source() -> None:
    assert set(HUB_LOADERS) == set(data.HUB_SOURCES)
    assert data.HUB_SOURCES["bbq"].label == "oskarvanderwal/bbq:All:test"
    assert data.HUB_SOURCES["crows_pairs"].label == "jannalu/crows_pairs_multilingual:english:test"


def test_hub_offline_raises_data_error(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError, match="walledai/AdvBench") as info:
        data.load_advbench(DataSource(None))
    assert "--data-dir" in str(info.value) and DATA_DIR_ENV in str(info.value)


@pytest.mark.parametrize("name", list(HUB_LOADERS))
def test_hub_failure_names_the_id(name: str, monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    datasets = pytest.importorskip("datasets")
    calls: list[tuple[Any, ...]] = []

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    spec = data.HUB_SOURCES[name]
    with pytest.raises(DataError, match="--data-dir") as info:
        HUB_LOADERS[name](DataSource(None))
    assert spec.label in str(info.value) and "Couldn't reach" in str(info.value)
    assert calls == [(spec.path, spec.config)]


def _fake_hub(monkeypatch: pytest.MonkeyPatch, rows: list[dict[str, Any]]) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [dict(r) for r in rows])


def test_hub_bbq_filters_and_orders(
    mirror: DataSource, monkeypatch: pytest.MonkeyPatch, fresh_cache: None
) -> None:
    local = data.load_bbq(mirror, ["Age", "Religion", "Nationality"])
    _fake_hub(monkeypatch, list(reversed(local.rows)))
    hub = data.load_bbq(DataSource(None), ["Religion", "Age"])
    assert hub.source == "hub:oskarvanderwal/bbq:All:test" and hub.files == ()
    assert [r["category"] for r in hub.rows][:: len(hub) - 1] == ["Age", "Religion"]
    assert len(hub) == 3680 + 1200
    assert hub.sha256 == sha256_json(list(hub.rows))
    assert data.available_bbq_categories(DataSource(None)) == BBQ_CATEGORIES
    with pytest.raises(DataError, match="SES"):
        data.load_bbq(DataSource(None), ["SES"])


def test_hub_adapters_reproduce_mirror_rows(
    mirror: DataSource, monkeypatch: pytest.MonkeyPatch, fresh_cache: None
) -> None:
    """Feed each adapter rows in its hub's shape (rebuilt from the mirror); expect the mirror's rows back."""
    hub = DataSource(None)
    stereo = data.load_stereoset(mirror)
    labels = {"anti-stereotype": 0, "stereotype": 1, "unrelated": 2}
    shaped = [
        {
            **{k: r[k] for k in ("id", "target", "bias_type", "context")},
            "sentences": {
                "sentence": [s["sentence"] for s in reversed(r["sentences"])],
                "gold_label": [labels[s["gold_label"]] for s in reversed(r["sentences"])],
            },
        }
        for r in stereo.rows
    ]
    _fake_hub(monkeypatch, shaped)
    assert data.load_stereoset(hub).rows == stereo.rows

    xstest = data.load_xstest(mirror)
    _fake_hub(monkeypatch, [{k: v for k, v in r.items() if k != "id"} for r in xstest.rows])
    assert data.load_xstest(hub).rows == xstest.rows

    adv = data.load_advbench(mirror)
    _fake_hub(monkeypatch, [{"prompt": r["goal"], "target": r["target"]} for r in adv.rows])
    assert data.load_advbench(hub).rows == adv.rows

    coconot = data.load_calibration_pool(mirror, "coconot_contrast")
    _fake_hub(monkeypatch, [
        {"id": r["id"], "category": r["category"], "subcategory": r["subcategory"],
         "prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"], "rejected": "No."}
        for r in coconot.rows
    ])
    assert data.load_calibration_pool(hub, "coconot_contrast").rows == coconot.rows


def test_hub_chat_adapters(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    hub = DataSource(None)
    _fake_hub(monkeypatch, [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao", "rejected": ""},
        {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": ""},  # same role twice: dropped
        {"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": ""},  # empty turn: dropped
        {"chosen": "\n\nHuman: q\n\nAssistant: r", "rejected": ""},
    ])
    hh = data.load_calibration_pool(hub, "hh_rlhf_harmless")
    assert [r["id"] for r in hh.rows] == ["hh_harmless_test_0", "hh_harmless_test_3"]
    assert [m["role"] for m in hh.rows[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert hh.rows[0]["messages"][3]["content"] == "ciao"

    _fake_hub(monkeypatch, [
        {"instruction": " Q1 ", "context": "", "response": "A1", "category": "open_qa"},
        {"instruction": "Q2", "context": "ctx", "response": "A2", "category": "closed_qa"},
        {"instruction": "Q3", "context": "", "response": "A3", "category": "open_qa"},
    ])
    dolly = data.load_calibration_pool(hub, "general")
    assert [r["id"] for r in dolly.rows] == ["dolly_open_qa_0", "dolly_open_qa_1"]
    expected = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    assert dolly.rows[0]["messages"] == expected

    _fake_hub(monkeypatch, [{"instruction": "Do X", "input": "details", "output": "I can't."}])
    stl = data.load_calibration_pool(hub, "safety_tuned_llamas")
    assert stl.rows[0]["messages"][0]["content"] == "Do X\n\ndetails"


def test_hub_schema_drift_is_a_data_error(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    _fake_hub(monkeypatch, [{"question": "renamed column"}])
    with pytest.raises(DataError, match="walledai/AdvBench"):
        data.load_advbench(DataSource(None))
    _fake_hub(monkeypatch, [{"id": "1", "sent_more": "a", "sent_less": "b", "bias_type": "x"}])
    with pytest.raises(DataError, match=r"hub:jannalu/crows_pairs_multilingual:english:test, row 0: missing"):
        data.load_crows_pairs(DataSource(None))


@pytest.mark.parametrize("name", ["crows_pairs_original", "xstest_labeled_completions"])
def test_hub_pinned_csv_path_matches_mirror(
    name: str,
    mirror: DataSource,
    shared_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_cache: None,
) -> None:
    """The real `datasets` csv builder on the mirror's bytes gives the same rows as the mirror reader."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    local = HUB_LOADERS[name](mirror)
    spec = data_hub.HUB_SOURCES[name]
    local_spec = dataclasses.replace(spec, data_files=str(local.files[0]))
    monkeypatch.setattr(data_hub, "HUB_SOURCES", {**data_hub.HUB_SOURCES, name: local_spec})
    hub = HUB_LOADERS[name](DataSource(None))
    assert hub.rows == local.rows
    assert hub.source == f"hub:{local.files[0]}:train"


def test_refusal_label_sources_load_from_the_mirror_with_their_provenance_hashes(shared_data_dir: Path) -> None:
    source = DataSource(shared_data_dir)
    sizes = {name: len(data.load_refusal_labels(source, name)) for name in data.REFUSAL_LABEL_SOURCES}
    assert sizes == {"xstest_llama2orig": 450, "xstest_llama2new": 450, "xstest_mistralguard": 450,
                     "xstest_gpt4": 450, "gptfuzz": 1540}
    gptfuzz = data.load_refusal_labels(source, "gptfuzz")
    assert gptfuzz.sha256 == "ca9e460c7fbcf3bc7c028c9e29297dd58cfbd54050f7729fbc635a6880a62a02"  # PROVENANCE.md
    assert sum(row["label"] == "0" for row in gptfuzz.rows) == 995
    assert data.load_refusal_labels(source, "xstest_llama2orig").sha256 == (
        data.load_xstest_labeled_completions(source).sha256)
    with pytest.raises(DataError, match="unknown refusal label source"):
        data.load_refusal_labels(source, "llama3")
