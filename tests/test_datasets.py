"""Tests of the dataset parsers on tiny fake trees of empty files with real Market/Duke/MSMT17 names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from reidreg.data.datamodule import ReIDDataModule
from reidreg.data.datasets import DatasetError, ReIDDataset, build_dataset
from reidreg.data.split_check import check_split, queries_without_match
from reidreg.data.synthetic import resolve_synthetic_options, shows_named_identity
from reidreg.errors import ConfigError


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()


def make_market(root: Path, folder: str = "Market-1501-v15.09.15") -> Path:
    dataset = root / folder
    touch(
        dataset / "bounding_box_train",
        "0002_c1s1_000451_03.jpg",
        "0002_c2s1_000551_01.jpg",
        "0007_c3s3_064444_02.jpg",
        "0010_c6s4_002202_01.jpg",
        "Thumbs.db",  # not an image: ignored
    )
    touch(dataset / "query", "0003_c1s1_000101_00.jpg", "0003_c4s1_000201_00.jpg", "0005_c2s1_000301_00.jpg")
    touch(
        dataset / "bounding_box_test",
        "0003_c1s1_000151_01.jpg",  # same camera as a query: kept here, the evaluation drops it
        "0003_c3s1_000251_01.jpg",
        "0005_c5s1_000351_01.jpg",
        "0000_c1s1_000001_01.jpg",  # distractor
        "0000_c6s1_000002_01.jpg",  # distractor
        "-1_c3s1_000003_01.jpg",  # junk
        "readme.txt",
    )
    return dataset


def make_duke(root: Path) -> Path:
    dataset = root / "DukeMTMC-reID"
    touch(
        dataset / "bounding_box_train", "0005_c2_f0046985.jpg", "0005_c8_f0046999.jpg", "0001_c1_f0000001.jpg"
    )
    touch(dataset / "query", "0011_c7_f0000011.jpg")
    touch(dataset / "bounding_box_test", "0011_c8_f0000012.jpg", "0000_c1_f0000013.jpg", "-1_c2_f0000014.jpg")
    return dataset


def msmt_name(pid: int, camera: int, index: int) -> str:
    return f"{pid:04d}/{pid:04d}_{index:03d}_{camera:02d}_0303morning_0015_0.jpg"


def make_msmt(root: Path, folder: str = "MSMT17_V1", inner: tuple[str, str] = ("train", "test")) -> Path:
    dataset = root / folder
    train_lines = [(msmt_name(0, 1, 0), 0), (msmt_name(0, 15, 1), 0), (msmt_name(1, 3, 0), 1)]
    val_lines = [(msmt_name(1, 4, 1), 1), (msmt_name(2, 5, 0), 2)]
    query_lines = [(msmt_name(0, 2, 0), 0), (msmt_name(7, 9, 0), 7)]
    gallery_lines = [(msmt_name(0, 6, 1), 0), (msmt_name(7, 10, 1), 7), (msmt_name(8, 11, 0), 8)]
    for image_folder, lines in ((inner[0], train_lines + val_lines), (inner[1], query_lines + gallery_lines)):
        for relative_path, _ in lines:
            touch(dataset / image_folder / relative_path.split("/")[0], relative_path.split("/")[1])
    for list_name, lines in (
        ("list_train.txt", train_lines),
        ("list_val.txt", val_lines),
        ("list_query.txt", query_lines),
        ("list_gallery.txt", gallery_lines),
    ):
        (dataset / list_name).write_text("".join(f"{path} {label}\n" for path, label in lines))
    return dataset


def pids_cams(samples: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    return [(Path(path).name, pid, camid) for path, pid, camid in samples]


@pytest.mark.parametrize("folder", ["Market-1501-v15.09.15", "Market-1501"])
def test_market_counts_relabelling_and_cameras(tmp_path: Path, folder: str) -> None:
    dataset_folder = make_market(tmp_path, folder)
    dataset = build_dataset("market1501", tmp_path, verbose=False)
    assert dataset.name == "market1501"
    assert dataset.root == dataset_folder.resolve()
    # train pids 2, 7, 10 relabelled 0, 1, 2 in sorted order; camera 1..6 -> 0..5
    assert pids_cams(dataset.train) == [
        ("0002_c1s1_000451_03.jpg", 0, 0),
        ("0002_c2s1_000551_01.jpg", 0, 1),
        ("0007_c3s3_064444_02.jpg", 1, 2),
        ("0010_c6s4_002202_01.jpg", 2, 5),
    ]
    assert dataset.num_train_pids == 3
    assert dataset.num_cameras == 6
    # query and gallery keep the original pids; junk (-1) dropped, distractors (0) kept in the gallery
    assert sorted(pid for _, pid, _ in dataset.query) == [3, 3, 5]
    assert sorted(pid for _, pid, _ in dataset.gallery) == [0, 0, 3, 3, 5]
    assert all(Path(path).is_file() and Path(path).is_absolute() for path, _, _ in dataset.gallery)


def test_dataset_folder_itself_as_root(tmp_path: Path) -> None:
    dataset_folder = make_market(tmp_path)
    assert build_dataset("market1501", dataset_folder, verbose=False).root == dataset_folder.resolve()


def test_distractors_are_dropped_from_train_and_query(tmp_path: Path) -> None:
    dataset_folder = make_market(tmp_path)
    touch(dataset_folder / "bounding_box_train", "0000_c1s1_000009_01.jpg")
    touch(dataset_folder / "query", "0000_c1s1_000009_01.jpg")
    dataset = build_dataset("market1501", tmp_path, verbose=False)
    assert [pid for _, pid, _ in dataset.train] == [0, 0, 1, 2]
    assert 0 not in {pid for _, pid, _ in dataset.query}


def test_verbose_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_market(tmp_path)
    dataset = build_dataset("market1501", tmp_path)
    printed = capsys.readouterr().out
    assert printed.strip() == dataset.summary()
    rows = {
        line.split("|")[0].strip(): [cell.strip() for cell in line.split("|")[1:]]
        for line in printed.splitlines()
    }
    assert rows["train"] == ["3", "4", "4"]  # ids, images, cameras
    assert rows["query"] == ["2", "3", "3"]
    assert rows["gallery"] == ["3", "5", "4"]


def test_dukemtmc(tmp_path: Path) -> None:
    make_duke(tmp_path)
    dataset = build_dataset("DukeMTMC", tmp_path, verbose=False)
    assert pids_cams(dataset.train) == [
        ("0001_c1_f0000001.jpg", 0, 0),
        ("0005_c2_f0046985.jpg", 1, 1),
        ("0005_c8_f0046999.jpg", 1, 7),
    ]
    assert pids_cams(dataset.query) == [("0011_c7_f0000011.jpg", 11, 6)]
    assert sorted(pid for _, pid, _ in dataset.gallery) == [0, 11]
    assert dataset.num_cameras == 8


@pytest.mark.parametrize(
    ("folder", "inner"),
    [
        ("MSMT17_V1", ("train", "test")),
        ("MSMT17_V2", ("mask_train_v2", "mask_test_v2")),
        ("MSMT17", ("train", "test")),
    ],
)
@pytest.mark.parametrize("combine_val", [False, True])
def test_msmt17(tmp_path: Path, folder: str, inner: tuple[str, str], combine_val: bool) -> None:
    dataset_folder = make_msmt(tmp_path, folder, inner)
    dataset = build_dataset("msmt17", tmp_path, verbose=False, combine_val=combine_val)
    assert dataset.root == dataset_folder.resolve()
    expected_train = [(0, 0), (0, 14), (1, 2)] + ([(1, 3), (2, 4)] if combine_val else [])
    assert [(pid, camid) for _, pid, camid in dataset.train] == expected_train
    assert dataset.num_train_pids == (3 if combine_val else 2)
    assert all(path.startswith(str(dataset_folder.resolve() / inner[0])) for path, _, _ in dataset.train)
    assert [(pid, camid) for _, pid, camid in dataset.query] == [(0, 1), (7, 8)]
    assert [(pid, camid) for _, pid, camid in dataset.gallery] == [(0, 5), (7, 9), (8, 10)]
    assert all(path.startswith(str(dataset_folder.resolve() / inner[1])) for path, _, _ in dataset.gallery)
    assert dataset.num_cameras == 15


def test_msmt17_dataset_folder_itself_as_root(tmp_path: Path) -> None:
    dataset_folder = make_msmt(tmp_path, "MSMT17_V2", ("mask_train_v2", "mask_test_v2"))
    assert build_dataset("msmt17", dataset_folder, verbose=False).root == dataset_folder.resolve()


def test_unknown_name_or_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cuhk03'.*market1501, dukemtmc, msmt17, synthetic"):
        build_dataset("cuhk03", tmp_path)
    with pytest.raises(ValueError, match="combine_val.*allowed: none"):
        build_dataset("market1501", tmp_path, combine_val=True)
    with pytest.raises(ValueError, match="unknown option.*combine_vall.*allowed: combine_val"):
        build_dataset("msmt17", tmp_path, combine_vall=True)
    with pytest.raises(ValueError, match="combine_val must be a bool"):
        build_dataset("msmt17", tmp_path, combine_val="yes")


def _market_error(tmp_path: Path, break_it: Callable[[Path], None]) -> str:
    """The DatasetError message after ``break_it`` damaged a valid Market-1501 tree."""
    dataset_folder = make_market(tmp_path)
    break_it(dataset_folder)
    with pytest.raises(DatasetError) as error:
        build_dataset("market1501", tmp_path, verbose=False)
    return str(error.value)


def empty_folder(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


def test_error_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nowhere'} does not exist.*bounding_box_train"):
        build_dataset("market1501", tmp_path / "nowhere")


def test_error_no_dataset_folder_in_root(tmp_path: Path) -> None:
    (tmp_path / "something_else").mkdir()
    with pytest.raises(
        DatasetError, match=f"found in {tmp_path};.*Market-1501-v15.09.15/.*0002_c1s1_000451_03"
    ):
        build_dataset("market1501", tmp_path)


def test_error_missing_subfolder(tmp_path: Path) -> None:
    message = _market_error(tmp_path, lambda folder: (folder / "query").rename(folder / "queries"))
    assert f"missing folder {tmp_path / 'Market-1501-v15.09.15' / 'query'};" in message
    assert "{bounding_box_train,query,bounding_box_test}" in message


def test_error_empty_split(tmp_path: Path) -> None:
    message = _market_error(tmp_path, lambda folder: empty_folder(folder / "query"))
    assert f"no usable images in {tmp_path / 'Market-1501-v15.09.15' / 'query'};" in message


def test_error_unparsable_name(tmp_path: Path) -> None:
    message = _market_error(tmp_path, lambda folder: touch(folder / "bounding_box_test", "IMG_1234.jpg"))
    assert "cannot parse the file name" in message and "IMG_1234.jpg" in message
    assert "expected" in message and "0002_c1s1_000451_03.jpg" in message


def test_error_camera_out_of_range(tmp_path: Path) -> None:
    message = _market_error(tmp_path, lambda folder: touch(folder / "query", "0003_c7s1_000101_00.jpg"))
    assert "camera c7 outside 1-6" in message and "0003_c7s1_000101_00.jpg" in message


def test_error_only_distractors_in_train(tmp_path: Path) -> None:
    def only_distractors(folder: Path) -> None:
        empty_folder(folder / "bounding_box_train")
        touch(folder / "bounding_box_train", "0000_c1s1_000009_01.jpg")

    assert "only distractors" in _market_error(tmp_path, only_distractors)


def test_error_duke_camera_nine(tmp_path: Path) -> None:
    touch(make_duke(tmp_path) / "query", "0011_c9_f0000011.jpg")
    with pytest.raises(DatasetError, match="camera c9 outside 1-8"):
        build_dataset("dukemtmc", tmp_path)


def test_msmt17_errors(tmp_path: Path) -> None:
    dataset_folder = make_msmt(tmp_path)
    (dataset_folder / "list_val.txt").unlink()
    build_dataset("msmt17", tmp_path, verbose=False)  # list_val is only needed with combine_val
    with pytest.raises(DatasetError, match=f"missing list file {dataset_folder / 'list_val.txt'}"):
        build_dataset("msmt17", tmp_path, combine_val=True)

    query_list = dataset_folder / "list_query.txt"
    query_list.write_text(f"{msmt_name(0, 16, 0)} 0\n")
    touch(dataset_folder / "test" / "0000", msmt_name(0, 16, 0).split("/")[1])
    with pytest.raises(DatasetError, match=f"camera 16 outside 1-15 in {query_list}:1"):
        build_dataset("msmt17", tmp_path)

    query_list.write_text(f"{msmt_name(0, 2, 0)}\n")
    with pytest.raises(DatasetError, match=f"cannot parse {query_list}:1"):
        build_dataset("msmt17", tmp_path)

    query_list.write_text("0000/0000_c1.jpg 0\n")
    with pytest.raises(DatasetError, match="cannot parse the file name"):
        build_dataset("msmt17", tmp_path)

    query_list.write_text(f"{msmt_name(5, 2, 0)} 5\n")
    with pytest.raises(
        DatasetError, match=f"names {dataset_folder / 'test' / msmt_name(5, 2, 0)}, which does not"
    ):
        build_dataset("msmt17", tmp_path)

    query_list.write_text("\n")
    with pytest.raises(DatasetError, match=f"empty list file {query_list}"):
        build_dataset("msmt17", tmp_path)


def test_msmt17_missing_image_folders(tmp_path: Path) -> None:
    dataset_folder = make_msmt(tmp_path)
    for path in (dataset_folder / "test").rglob("*.jpg"):
        path.unlink()
    for path in sorted((dataset_folder / "test").iterdir()):
        path.rmdir()
    (dataset_folder / "test").rmdir()
    with pytest.raises(DatasetError, match=f"missing folder {dataset_folder / 'test'};.*MSMT17_V1"):
        build_dataset("msmt17", tmp_path)
    for path in (dataset_folder / "train").rglob("*.jpg"):
        path.unlink()
    for path in sorted((dataset_folder / "train").iterdir()):
        path.rmdir()
    (dataset_folder / "train").rmdir()
    with pytest.raises(DatasetError, match="neither train/test nor mask_train_v2/mask_test_v2"):
        build_dataset("msmt17", tmp_path)


def test_reid_dataset_requires_contiguous_train_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train pids must be the labels 0..N-1"):
        ReIDDataset(name="x", root=tmp_path, train=[("a.jpg", 1, 0)], query=[], gallery=[])


def data_module(root: Path, val_identities: float = 0) -> ReIDDataModule:
    return ReIDDataModule(dataset="market1501", root=str(root), val_identities=val_identities, num_workers=0)


def test_queries_without_a_match_are_counted_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset_folder = make_market(tmp_path)
    # pid 9 is not in the gallery; pid 5's only gallery image is from camera 5, as this query's
    touch(dataset_folder / "query", "0009_c2s1_000401_00.jpg", "0005_c5s1_000501_00.jpg")
    data_module(tmp_path).load()
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"test split of market1501 ({dataset_folder.resolve()}): 2 of the 5 queries have no match in the "
        "gallery (an image of the same identity from another camera; same-camera images do not count)"
    )
    assert (
        "0005_c5s1_000501_00.jpg (pid 5, c5)" in warnings[0]
        and "0009_c2s1_000401_00.jpg (pid 9, c2)" in warnings[0]
    )


def test_a_test_split_where_no_query_has_a_match_is_refused_before_training(
    tiny_config, tmp_path: Path
) -> None:
    from reidreg.train import train

    dataset_folder = make_market(tmp_path / "data")
    empty_folder(dataset_folder / "query")
    touch(dataset_folder / "query", "0003_c1s1_000101_00.jpg")  # the gallery has pid 3 from c1 and c3
    empty_folder(dataset_folder / "bounding_box_test")
    touch(dataset_folder / "bounding_box_test", "0003_c1s1_000151_01.jpg", "0000_c2s1_000001_01.jpg")
    cfg = tiny_config(f"paths.data_dir={tmp_path / 'data'}", "data.val_identities=0")
    cfg.dataset.name, cfg.dataset.options = "market1501", {}
    with pytest.raises(DatasetError) as error:
        train(cfg)
    assert str(error.value) == (
        f"test split of market1501 ({dataset_folder.resolve()}): none of the 1 queries has a match in the "
        "gallery of 2 images (an image of the same identity from another camera; same-camera images do not "
        "count), so no metric can be computed; check the dataset's query and gallery files."
    )
    assert not Path(cfg.paths.output_dir).exists()  # nothing started


def test_a_validation_hold_out_without_a_gallery_is_refused(tmp_path: Path) -> None:
    make_market(tmp_path)  # only pid 2 has 2+ cameras, one image in each: both become queries
    with pytest.raises(ConfigError) as error:
        data_module(tmp_path, val_identities=1).load()
    assert str(error.value) == (
        "validation hold-out data.val_identities=1: the gallery set is empty; hold out more identities, "
        "or set data.val_identities=0 to train without validation."
    )


def test_a_validation_hold_out_with_some_unmatched_queries_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset_folder = make_market(tmp_path)
    touch(dataset_folder / "bounding_box_train", "0007_c3s3_064544_02.jpg", "0007_c1s3_064644_02.jpg")
    data = data_module(tmp_path, val_identities=2)  # pid 2 (c1, c2) and 7 (c3, c3, c1): c1 query matches
    data.load()
    assert len(data.val_query) == 4 and len(data.val_gallery) == 1
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(
        "validation hold-out data.val_identities=2: 3 of the 4 queries have no match in the gallery"
    )


def synthetic_hold_out(
    root: Path, *, mislabeled_percent: int, val_identities: int, drop: bool
) -> ReIDDataModule:
    """The loaded data module of the tiny synthetic set with that label noise and hold-out."""
    data = ReIDDataModule(
        dataset="synthetic",
        root=str(root),
        dataset_options={"preset": "tiny", "mislabeled_percent": mislabeled_percent},
        val_identities=val_identities,
        val_drop_mislabeled=drop,
        num_workers=0,
    )
    data.load()
    return data


@pytest.mark.parametrize(("mislabeled_percent", "drop"), [(0, False), (30, False), (30, True)])
def test_a_hold_out_of_noisy_synthetic_identities_warns_unless_it_drops_the_wrong_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mislabeled_percent: int, drop: bool
) -> None:
    synthetic_hold_out(tmp_path, mislabeled_percent=mislabeled_percent, val_identities=2, drop=drop)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    noisy = [message for message in warnings if "wrong labels" in message]
    assert len(noisy) == (1 if mislabeled_percent and not drop else 0), warnings
    if noisy:
        assert noisy[0].startswith("data.val_identities=2 on synthetic data with 30 % wrong labels: ")
        assert "data.val_drop_mislabeled=true" in noisy[0]


def test_a_noisy_hold_out_can_keep_only_its_correctly_labelled_images(tmp_path: Path) -> None:
    noisy, clean = (
        synthetic_hold_out(tmp_path, mislabeled_percent=30, val_identities=3, drop=drop)
        for drop in (False, True)
    )
    truth = resolve_synthetic_options("tiny", mislabeled_percent=30)
    held_out = set(noisy.val_query + noisy.val_gallery)
    wrong = {sample for sample in held_out if not shows_named_identity(sample[0], truth)}
    assert wrong  # the case in point: a plain hold-out of noisy identities has wrong labels
    assert set(clean.val_query + clean.val_gallery) == held_out - wrong
    assert clean.train_samples == noisy.train_samples  # the same identities held out: the same training set
    # still one query per identity and camera
    assert len(clean.val_query) == len({(pid, camid) for _, pid, camid in held_out - wrong})
    with pytest.raises(ValueError, match="val_drop_mislabeled needs the synthetic dataset"):
        ReIDDataModule(dataset="market1501", root=str(tmp_path), val_drop_mislabeled=True)


@pytest.mark.parametrize("role", ["query", "gallery"])
def test_an_empty_query_or_gallery_set_is_refused(role: str) -> None:
    sample = ("a.jpg", 1, 0)
    query, gallery = ([], [sample]) if role == "query" else ([sample], [])
    with pytest.raises(DatasetError, match=f"^test split: the {role} set is empty; fix it.$"):
        check_split(query, gallery, name="test split", error=DatasetError, fix="fix it.")


def test_queries_without_match_follow_the_market_protocol() -> None:
    query = [("q0", 1, 0), ("q1", 1, 1), ("q2", 2, 0), ("q3", 3, 0)]
    gallery = [("g0", 1, 0), ("g1", 2, 0), ("g2", 2, 1), ("g3", 0, 1)]
    # q0: pid 1 only in camera 0 of the gallery; q1 matches g0; q2 matches g2; q3: pid 3 absent
    assert queries_without_match(query, gallery) == [0, 3]
