"""Config loading: unknown sections and keys, value types, the one input size, path resolution."""

import pickle
from pathlib import Path

import pytest
import torch

from liaf_lab.experiments.builders import build_detector, build_distiller
from liaf_lab.experiments.config import (
    PROJECT_ROOT, ResolvedConfig, check_config, input_size, list_presets, load_config, method_config, resolve_config,
)

SHIPPED_TEACHER = "data_samples/checkpoints/teacher_tiny.pt"


@pytest.mark.parametrize("name", list_presets())
def test_presets_pass_their_own_check(name):
    cfg = load_config(name)
    assert set(cfg) == {"data", "input", "teacher", "student", "kd", "train_teacher", "stage1", "distill"}
    assert input_size(cfg) == {"tiny": (160, 267), "bench": (160, 267), "paper": (800, 1333), "gfl_tiny": (160, 267),
                                "gfl_coco": (800, 1333), "gfl_kitti": (800, 1333), "raccoon": (256, 427)}[name]


@pytest.mark.parametrize("override, message", [
    # a misspelled data key used to leave the bundled val set in place (AP 0.0 on the wrong data)
    ("data.val_image=x", r"config tiny: \[data\] with kind = 'coco': unknown keys \['val_image'\]; "
                         r"its keys are \['kind', 'train_images', 'train_ann', 'val_images', 'val_ann', "
                         r"'test_images', 'test_ann', 'allow_outside_images', 'skip_bad_images'\]"),
    ("kd.liaf.loss_wieght=5", r"unknown key kd.liaf.loss_wieght; the options of 'liaf' are \['loss_weight', "
                              r"'projector', 'num_selectors', 'roi_size', 'sampling_ratio', 'normalize', 'mask_scale', "
                              r"'mask_side', 'detach_scores', 'freeze_selectors', 'diversity_weight', 'logit_scale'\]"),
    ("kd.mask_scale=count", r"kd.mask_scale is an option of \['liaf', 'liaf_paper'\]: set it per method, e.g. kd.liaf.mask_scale"),
    ("kd.nope.x=1", r"no distiller is registered as 'nope' \(\[kd.nope\]\); registered: \["),
    ("kd.liaf.mask_ratio=0.65", r"unknown key kd.liaf.mask_ratio; the options of 'liaf' are"),
    ("kd.mgd.mask_ratio=0.65", r"unknown key kd.mgd.mask_ratio; the options of 'mgd' are \['alpha', 'lambda_mask'\]"),
    ("kd.a.b.c=1", r"override 'kd.a.b.c=1' must look like section.key=value"),
    ("student.min_sise=320", r"unknown key student.min_sise; the keys of \[student\] are "
                             r"\['arch', 'depth', 'width_mult', 'fpn_channels', 'frozen_bn', 'weights', "
                             r"'weights_backbone', 'center_sampling_radius', 'detections_per_img', "),
    ("student.min_size=320", r"student.min_size is now input.min_size: one key sets the input size of teacher and "
                             r"student \(--set input.min_size=...\)"),
    ("teacher.max_size=320", r"teacher.max_size is now input.max_size"),
    ("input.size=320", r"unknown key input.size; the keys of \[input\] are \['min_size', 'max_size'\]"),
    ("train_teacher.iterations=abc", r"config tiny: \[train_teacher\] training option iterations='abc' must be a positive int"),
    ("distill.iterations=0", r"\[distill\] training option iterations=0 must be a positive int"),
    ("stage1.iteratons=5", r"\[stage1\] unknown training option 'iteratons'; its options are \['iterations', "),
    ("stage1.seed=3", r"stage1.seed is not a config key: the seed of a run is --seed"),
    ("kd.liaf.roi_size=7", r"kd.liaf.roi_size=7 must be a list of two positive ints"),
    ("kd.liaf.roi_size=[7, 0]", r"kd.liaf.roi_size=\[7, 0\] must be a list of two positive ints"),
    ("kd.liaf.num_selectors=2.5", r"kd.liaf.num_selectors=2.5 must be a positive int"),
    ("kd.liaf.normalize=images", r"kd.liaf.normalize='images' must be one of \['image', 'batch'\]"),
    ("kd.inherit=1", r"kd.inherit=1 must be true or false"),
    ("kd.fitnet.loss_weight=-1", r"kd.fitnet.loss_weight=-1 must be a finite number >= 0"),
    ("teacher.arch=yolo", r"teacher.arch='yolo' must be one of \['retinanet', 'fcos', 'fasterrcnn', 'gfl'\]"),
    ("input.min_size=320.0", r"input.min_size=320.0 must be a positive int"),
    ("input.max_size=100", r"input.min_size=160 is larger than input.max_size=100"),
    ("data.kind=kitti", r"\[data\] with kind = 'kitti': missing keys \['root'\]; its keys are "
                        r"\['kind', 'root', 'classes', 'merge', 'test_fraction', 'test_ids', 'skip_bad_images'\]"),
    ("data.kind=yolo", r"data.kind='yolo' must be one of \['coco', 'kitti', 'voc', 'shapes'\]"),
    ("data.kind=[1]", r"data.kind=\[1\] must be one of \['coco', 'kitti', 'voc', 'shapes'\]"),
    ("data.skip_bad_images=yes", r"data.skip_bad_images='yes' must be true or false"),
    ("data.train_images=3", r"data.train_images=3 must be a string"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", [override])


def test_unknown_section_in_an_override_or_a_file(tmp_path):
    with pytest.raises(ValueError, match=r"override 'traning.lr=0.1': unknown section \[traning\]; "
                                         r"the sections are \['data', 'input', 'teacher', 'student', 'kd', "
                                         r"'train_teacher', 'stage1', 'distill'\]"):
        load_config("tiny", ["traning.lr=0.1"])
    text = (PROJECT_ROOT / "liaf_lab" / "configs" / "tiny.toml").read_text()
    path = tmp_path / "mine.toml"
    path.write_text(text + "\n[distil]\niterations = 5\n")
    with pytest.raises(ValueError, match=rf"config {path}: unknown section \[distil\]"):
        load_config(path)
    path.write_text(text.replace("[input]\n", "[input]\nmax_sise = 200\n"))
    with pytest.raises(ValueError, match=rf"config {path}: unknown key input.max_sise"):
        load_config(path)
    path.write_text(text.replace("[input]\n", "[inputs]\n"))
    with pytest.raises(ValueError, match=r"unknown section \[inputs\]"):
        load_config(path)


def test_missing_sections_and_keys():
    cfg = load_config("tiny")
    with pytest.raises(ValueError, match=r"missing sections \['input'\]"):
        check_config({k: v for k, v in cfg.items() if k != "input"})
    with pytest.raises(ValueError, match=r"\[teacher\] lacks the keys \['fpn_channels'\]"):
        check_config({**cfg, "teacher": {k: v for k, v in cfg["teacher"].items() if k != "fpn_channels"}})


def test_optional_sections_default_to_empty(tmp_path):
    path = tmp_path / "short.toml"
    text = (PROJECT_ROOT / "liaf_lab" / "configs" / "tiny.toml").read_text()
    path.write_text(text[:text.index("[train_teacher]")])
    cfg = load_config(path, ["kd.fitnet.loss_weight=2"])
    assert cfg["kd"] == {"fitnet": {"loss_weight": 2}} and cfg["distill"] == cfg["stage1"] == cfg["train_teacher"] == {}


def test_a_resolved_config_derives_variants_without_reading_its_file_again(tmp_path):
    path = tmp_path / "short.toml"  # without [kd] and the training sections: their order is the loader's
    text = (PROJECT_ROOT / "liaf_lab" / "configs" / "tiny.toml").read_text()
    path.write_text(text[:text.index("[train_teacher]")])
    variants = (["kd.inherit=true"], ["data.kind=kitti", "data.root=/k"], ["distill.iterations=-1"])
    expected = {}
    for extra in variants:
        try:
            expected[extra[0]] = load_config(path, ["distill.iterations=3", *extra])
        except ValueError as err:
            expected[extra[0]] = str(err)
    cfg = load_config(path, ["distill.iterations=3"])
    assert isinstance(cfg, ResolvedConfig) and (cfg.source, cfg.overrides) == (str(path), ("distill.iterations=3",))
    path.unlink()  # what follows reads no file
    for extra in variants[:2]:
        variant = cfg.with_overrides(extra)
        assert variant == expected[extra[0]] and list(variant) == list(expected[extra[0]])  # same keys, same order
        assert variant.overrides == ("distill.iterations=3", *extra) and resolve_config(cfg, extra) == variant
    with pytest.raises(ValueError) as err:
        cfg.with_overrides(variants[2])
    assert str(err.value) == expected["distill.iterations=-1"]  # the loader's message
    assert resolve_config(cfg) is cfg.with_overrides([]) is cfg
    copy = pickle.loads(pickle.dumps(cfg))  # as a study's run processes and Slurm jobs receive it
    assert type(copy) is ResolvedConfig and copy == cfg and copy.overrides == cfg.overrides
    assert copy.with_overrides(variants[0]) == expected["kd.inherit=true"]
    for change in (lambda c: c.__setitem__("kd", {}), lambda c: c.update(kd={}), lambda c: c.pop("kd")):
        with pytest.raises(TypeError, match=rf"config '{path}' is resolved and read-only: derive another"):
            change(cfg)


def test_changing_data_kind_drops_the_other_kinds_keys():
    cfg = load_config("tiny", ["data.root=/data/kitti/training", "data.kind=kitti", "data.skip_bad_images=true"])
    assert cfg["data"] == {"kind": "kitti", "root": "/data/kitti/training", "skip_bad_images": True}
    voc = load_config("tiny", ["data.kind=voc", "data.root=/data/voc", "data.classes=['a', 'b']"])
    assert voc["data"] == {"kind": "voc", "root": "/data/voc", "classes": ["a", "b"]}
    with pytest.raises(ValueError, match=r"data.classes=\['a', 1\] must be a list of strings"):
        load_config("tiny", ["data.kind=voc", "data.root=/data/voc", "data.classes=['a', 1]"])
    with pytest.raises(ValueError, match=r"data.merge=\{'Van': 1\} must be a table of strings to strings"):
        load_config("tiny", ["data.kind=kitti", "data.root=/k", "data.merge={'Van': 1}"])


def test_test_split_keys_are_known_and_checked():
    voc = load_config("tiny", ["data.kind=voc", "data.root=/data/voc", "data.test_set=test"])
    assert voc["data"] == {"kind": "voc", "root": "/data/voc", "test_set": "test"}
    kitti = ["data.kind=kitti", "data.root=/k"]
    assert load_config("tiny", [*kitti, "data.test_fraction=0.1"])["data"]["test_fraction"] == 0.1
    assert load_config("tiny", [*kitti, "data.test_ids=['000001']"])["data"]["test_ids"] == ["000001"]
    for override, message in [
        ("data.test_fraction=1.5", r"data.test_fraction=1.5 must be between 0 and 1, exclusive"),
        ("data.test_fraction=0", r"data.test_fraction=0 must be between 0 and 1, exclusive"),
        ("data.test_fraction=a", r"data.test_fraction='a' must be a finite number >= 0"),
        ("data.test_ids=000001", r"data.test_ids='000001' must be a list of strings"),
        ("data.test_set=test", r"\[data\] with kind = 'kitti': unknown keys \['test_set'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config("tiny", [*kitti, override])
    with pytest.raises(ValueError, match=r"data.test_fraction and data.test_ids are both set"):
        load_config("tiny", [*kitti, "data.test_fraction=0.1", "data.test_ids=['000001']"])
    with pytest.raises(ValueError, match=r"\[data\] with kind = 'voc': unknown keys \['test_fraction'\]"):
        load_config("tiny", ["data.kind=voc", "data.root=/data/voc", "data.test_fraction=0.1"])


def test_one_key_sets_the_input_size_of_both_detectors_and_the_distiller():
    torch.manual_seed(0)
    cfg = load_config("tiny", ["input.min_size=64"])
    assert input_size(cfg) == (64, 107)
    teacher, student = build_detector(cfg, "teacher", 6), build_detector(cfg, "student", 6)
    for model in (teacher, student):
        assert (model.transform.min_size, model.transform.max_size) == ((64,), 107)
    assert build_distiller("liaf", cfg, student).strides == {"0": 8.0, "1": 16.0, "2": 32.0, "p6": 64.0, "p7": 128.0}
    square = load_config("tiny", ["input.min_size=64", "input.max_size=64"])
    assert build_detector(square, "student", 6).transform.max_size == 64


def test_relative_weights_path_resolves_like_data_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not found here, so taken from the project root
    assert not Path(SHIPPED_TEACHER).exists()
    cfg = load_config("tiny")
    teacher = build_detector(cfg, "teacher", 6, weights_path=SHIPPED_TEACHER)
    assert teacher.transform.min_size == (160,)
    with pytest.raises(FileNotFoundError, match=rf"nowhere.pt not found \(looked in {tmp_path} and {PROJECT_ROOT}\)"):
        build_detector(cfg, "teacher", 6, weights_path="nowhere.pt")


def test_method_config_keeps_only_the_run_s_own_method_tables():
    """What binds a run folder: another method's options never block resuming a run."""
    cfg = load_config("tiny")
    assert set(cfg["kd"]) > {"inherit", "liaf", "maskd", "fgd"}
    liaf = method_config(cfg, "liaf")
    assert liaf["kd"] == {"inherit": cfg["kd"]["inherit"], "liaf": cfg["kd"]["liaf"]}
    assert set(method_config(cfg, "liaf+maskd")["kd"]) == {"inherit", "liaf", "maskd"}
    assert method_config(cfg, "none")["kd"] == method_config(cfg, None)["kd"] == {"inherit": cfg["kd"]["inherit"]}
    assert {k: v for k, v in liaf.items() if k != "kd"} == {k: v for k, v in cfg.items() if k != "kd"}
    other = load_config("tiny", ["kd.fgd.temperature=0.3"])
    assert method_config(other, "liaf") == liaf and method_config(other, "fgd") != method_config(cfg, "fgd")


def test_a_variant_reads_its_method_s_table_except_the_options_it_fixes():
    """``liaf_paper`` takes ``[kd.liaf]`` (loss weight, selectors) but keeps its literal options; its own table wins."""
    cfg = load_config("tiny", ["kd.liaf.normalize=image", "kd.liaf.mask_scale=count", "kd.liaf.num_selectors=4",
                               "kd.liaf_paper.loss_weight=0.3"])
    student = build_detector(cfg, "student", 6)
    d = build_distiller("liaf_paper", cfg, student)
    assert d.mask_scale == "literal" and all(s.normalize == "batch" and s.num_selectors == 4
                                              for s in d.selectors.values())
    assert d.loss_weight == 0.3
    assert set(method_config(cfg, "liaf_paper")["kd"]) == {"inherit", "liaf", "liaf_paper"}


# MasKD's public configs start the student mask after 5000 (FCOS) or 7000 (RetinaNet) of the ~176k iterations
# of their 2x schedule; each preset starts it after the same share of its own schedule (docs/distillers.md).
MASKD_SOURCE = {"bench": 5000, "tiny": 5000, "raccoon": 5000, "gfl_tiny": 7000, "paper": 7000, "gfl_coco": 7000,
                "gfl_kitti": 7000}


@pytest.mark.parametrize("name", list_presets())
def test_maskd_warmup_is_the_public_share_of_each_preset_s_schedule(name):
    cfg = load_config(name)
    want = round(MASKD_SOURCE[name] * cfg["distill"]["iterations"] / 175_920)
    assert cfg["kd"]["maskd"]["custom_mask_warmup"] == want


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_has_a_table_for_every_registered_method(name):
    from liaf_lab.distillers import list_distillers, variant_of

    methods = {m for m in list_distillers() if variant_of(m)[0] == m}
    assert methods <= set(load_config(name)["kd"])


def test_a_detector_section_takes_its_arch_s_own_options_checked_and_passes_them_on():
    gfl = ['teacher.arch="gfl"', 'student.arch="gfl"']
    cfg = load_config("bench", [*gfl, "student.reg_max=8", "student.atss_topk=5", "student.num_groups=8"])
    student, teacher = build_detector(cfg, "student", 6), build_detector(cfg, "teacher", 6)
    assert (student.head.reg_max, student.head.atss_topk, teacher.head.reg_max) == (8, 5, 16)
    assert {m.num_groups for m in student.head.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    assert {m.num_groups for m in teacher.head.modules() if isinstance(m, torch.nn.GroupNorm)} == {32}  # gcd(32, 64)
    assert build_detector(load_config("bench", ["student.center_sampling_radius=2.0"]), "student", 6
                          ).center_sampling_radius == 2.0  # an FCOS option
    with pytest.raises(ValueError, match=r"unknown key student.reg_max; the keys of \[student\] are .*center_sampling"):
        load_config("bench", ["student.reg_max=8"])  # FCOS has no bins
    with pytest.raises(ValueError, match="student.atss_topk=0 must be a positive int"):
        load_config("bench", [*gfl, "student.atss_topk=0"])
    with pytest.raises(ValueError, match="num_groups must be an int >= 1 that divides the head's 32 channels"):
        build_detector(load_config("bench", [*gfl, "student.num_groups=5"]), "student", 6)
    with pytest.raises(ValueError, match="student.arch"):
        load_config("bench", ['student.arch="yolo"'])
