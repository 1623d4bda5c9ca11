"""One config per concept: the typed loader's errors, one LatencyConfig, one budget name, one data spec."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from compress.data import DatasetSpec
from compress.distill.config import DistillConfig, load_recipe
from compress.errors import ConfigError
from compress.latency import LatencyConfig
from compress.pipeline import load_run_recipe
from compress.pipeline.finish import prune_key
from compress.pipeline.recipe import RunRecipe
from compress.pipeline.standin import StandInRecipe, load_standin_recipe
from compress.prune import PruneConfig, build_samples, load_prune_config
from compress.structured import dump_yaml, load_record, to_plain, translate_renamed
from compress.teacher_ref import StandInTraining, TeacherRef
from search_spaces import StudentConfig
from teacher import TeacherConfig
from tests.paths import REPO

RECIPES = REPO / "recipes"
QUICKSTART = RECIPES / "quickstart_cpu.yaml"


@pytest.mark.parametrize("override, suggestion", [
    ("search.latncy.mode=measured", "'latency'"),          # a close name at the same level
    ("prune.train_iters=2", "'prune.distill.train_iters'"),  # a key that lives one level down
    ("data.train.synthetic.heigt=64", "'height'"),
])
def test_unknown_keys_get_a_did_you_mean(override, suggestion):
    with pytest.raises(ConfigError, match="(?i)did you mean") as err:
        load_run_recipe(QUICKSTART, [override])
    assert suggestion in str(err.value) and len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("old, new, value", [
    ("out", "run_dir", "runs/p"),
    ("mlflow", "tracking.enabled", "false"),
    ("tracking_uri", "tracking.uri", "sqlite:///x.db"),
    ("experiment", "tracking.experiment", "e"),
])
def test_a_renamed_key_names_its_new_name_in_a_file_and_in_an_override(tmp_path, old, new, value):
    with pytest.raises(ConfigError, match=f"^override: key '{old}' was renamed to '{new}'$"):
        load_prune_config(None, [f"{old}={value}"])
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(f"{old}: {value}\n")
    with pytest.raises(ConfigError, match=f"prune recipe {recipe}: key '{old}' was renamed to '{new}'$"):
        load_prune_config(recipe)
    cfg = load_prune_config(None, [f"{new}={value}"])  # the new key reads what the old one did
    assert str(cfg.run_dir if new == "run_dir" else getattr(cfg.tracking, new.split(".")[1])).lower() == value


@pytest.mark.parametrize("load, old, new, value", [
    (load_run_recipe, "data.labels.iters", "teacher.iters", "2"),
    (load_run_recipe, "prune.distill.teacher_iters", "teacher.iters", "2"),
    (load_run_recipe, "data.labels.size", "data.size", "[64,128]"),
    (load_recipe, "teacher.cache.iters", "teacher.iters", "2"),
    (load_recipe, "teacher.cache.size", "data.size", "[64,128]"),
    (load_prune_config, "distill.teacher_iters", "teacher.iters", "2"),
    (load_prune_config, "teacher_iters", "teacher.iters", "2"),
])
def test_the_teachers_iterations_and_the_label_size_have_one_key_each(load, old, new, value):
    with pytest.raises(ConfigError, match=f"^override: key '{old}' was renamed to '{new}'$"):
        load(None, [f"{old}={value}"])
    teacher = ["data.labels.folder=labels"] if load is load_recipe else []  # a distill run needs its labels
    cfg = load(None, [*teacher, f"{new}={value}"])  # the new key reads what the old one did
    got = cfg
    for part in new.split("."):
        got = getattr(got, part)
    assert str(got).replace(" ", "") == value


def test_a_crop_and_a_label_size_stay_two_keys():
    recipe = load_run_recipe(QUICKSTART, ["data.size=[64,128]", "data.crop_size=[32,64]"])
    assert (recipe.data.size, recipe.data.crop_size) == ([64, 128], [32, 64])
    with pytest.raises(ConfigError, match=r"^data.size: got \[60, 128\], expected \[height, width\]"):
        load_run_recipe(QUICKSTART, ["data.size=[60,128]"])


def test_every_recipe_spells_tracking_and_the_output_folder_alike():
    from compress.pipeline.recipe import RunRecipe
    from compress.prune.config import PruneConfig
    from compress.tracking import TrackingConfig

    assert RunRecipe().tracking == PruneConfig().tracking == TrackingConfig()
    assert {"run_dir", "tracking"} <= set(vars(PruneConfig())) and hasattr(RunRecipe(), "run_dir")
    with pytest.raises(ConfigError, match="^tracking.enabled=false: `ffsc run` records the search in MLflow"):
        load_run_recipe(QUICKSTART, ["tracking.enabled=false"])
    prune = load_prune_config(RECIPES / "prune_to_budget.yaml")  # the shipped recipe uses the new keys
    assert prune.run_dir == "runs/prune/fast_foundationstereo" and prune.tracking.enabled


def test_student_and_teacher_configs_read_through_the_same_loader(tmp_path):
    with pytest.raises(ConfigError, match="unknown field.*hiden_dim; did you mean 'hidden_dim'"):
        StudentConfig.from_dict({"hiden_dim": 64})
    (tmp_path / "cfg.yaml").write_text("vit_size: vits\nvalid_iters: 8\nofficial_only_key: 1\n")
    assert TeacherConfig.from_yaml(tmp_path / "cfg.yaml").vit_size == "vits"  # official extra keys ignored
    with pytest.raises(ConfigError, match="beside the checkpoint"):
        TeacherConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="should be a YAML mapping"):
        StudentConfig.from_yaml(tmp_path / "list.yaml")


def test_one_latency_config_for_search_prune_and_the_table():
    recipe = load_run_recipe(QUICKSTART, ["height=96", "search.latency.clock=thread", "search.latency.threads=1"])
    lat = recipe.search.latency
    assert isinstance(lat, LatencyConfig) and (lat.height, lat.width) == (96, 128)  # the working size
    assert lat.timing()["clock"] == "thread" and lat.timing()["intra_op_threads"] == 1
    assert load_run_recipe(QUICKSTART, ["search.latency.height=480"]).search.latency.height == 480
    prune = load_prune_config(None, ["latency.backend=torch", "budget_gmacs=1"])
    assert isinstance(prune.latency, LatencyConfig) and (prune.latency.height, prune.latency.width) == (480, 640)
    with pytest.raises(ConfigError, match="latency.clock"):
        load_run_recipe(QUICKSTART, ["search.latency.clock=sundial"])
    with pytest.raises(ConfigError, match="latency.mode"):
        load_prune_config(None, ["latency.mode=guessed"])


def test_budget_has_one_name_from_recipe_to_report():
    recipe = load_run_recipe(QUICKSTART, ["prune.ratio=null", "prune.budget_ms=5", "search.budget_ms=9"])
    assert recipe.prune.budget == ("latency_ms", 5.0) and recipe.search.budget_ms == 9.0
    assert load_prune_config(None, ["budget_ms=5"]).budget == ("latency_ms", 5.0)
    with pytest.raises(ConfigError, match="set exactly one of budget_ms"):
        load_prune_config(None, ["budget_ms=5", "ratio=0.5"])
    with pytest.raises(ConfigError, match="prune.enabled needs one of prune.budget_ms"):
        load_run_recipe(QUICKSTART, ["prune.ratio=null"])
    from compress.pipeline.search import study_spec

    assert study_spec(recipe).budget_ms == 9.0


def test_resolved_recipes_round_trip_through_yaml(tmp_path):
    recipe = load_run_recipe(QUICKSTART, ["data.train.synthetic.object_size=[0.1,0.3]"])
    assert recipe.data.train.synthetic.object_size == (0.1, 0.3)  # the generator's own config, tuples and all
    dump_yaml(recipe, tmp_path / "recipe.yaml")
    assert load_run_recipe(tmp_path / "recipe.yaml") == recipe
    distill = load_recipe(RECIPES / "distill.yaml")
    dump_yaml(distill, tmp_path / "distill.yaml")
    assert load_recipe(tmp_path / "distill.yaml") == distill
    prune = load_prune_config(RECIPES / "prune_to_budget.yaml")
    dump_yaml(prune, tmp_path / "prune.yaml")
    assert load_prune_config(tmp_path / "prune.yaml") == prune
    assert yaml.safe_load((tmp_path / "prune.yaml").read_text())["budget_ms"] == 25.0


def test_prune_data_is_a_dataset_spec():
    cfg = load_prune_config(None, ["budget_gmacs=1", "data.num_samples=2", "data.size=[32,64]",
                                   "data.synthetic.height=64", "data.synthetic.width=96"])
    assert isinstance(cfg.data, DatasetSpec) and cfg.data.kind == "auto" and cfg.data.path is None
    samples = build_samples(cfg)
    assert len(samples) == 2 and tuple(samples[0]["left"].shape) == (3, 32, 64)  # auto without a path: synthetic
    with pytest.raises(ConfigError, match="needs a path"):
        DatasetSpec(kind="middlebury")


def test_the_search_proxy_defaults_to_inheritance_and_distill_stays_selectable():
    # benchmarks/search_quality.py: inheritance ranks students like their final accuracy (tau 0.70 vs 0.42).
    assert load_run_recipe(None).search.proxy == "inherit"
    gpu = load_run_recipe(RECIPES / "fast_foundationstereo_nas.yaml").search
    assert gpu.proxy == "inherit" and gpu.parent_steps == 10 * gpu.distill_steps  # the benchmarked ratio
    quick = load_run_recipe(QUICKSTART).search
    assert quick.proxy == "inherit" and quick.parent_steps > quick.distill_steps  # shorter: the 5-minute goal
    assert load_run_recipe(QUICKSTART, ["search.proxy=distill"]).search.proxy == "distill"
    with pytest.raises(ConfigError, match="parent_steps: got 0"):
        load_run_recipe(QUICKSTART, ["search.parent_steps=0"])


@pytest.mark.parametrize("load, old, new", [
    (load_prune_config, "distill.lr", "distill.optim.lr"),
    (load_prune_config, "distill.grad_clip", "distill.optim.grad_clip"),
    (load_run_recipe, "teacher.train_lr", "teacher.train.optim.lr"),
    (load_run_recipe, "prune.distill.lr", "prune.distill.optim.lr"),
    (load_run_recipe, "prune.distill.grad_clip", "prune.distill.optim.grad_clip"),
    (load_standin_recipe, "lr", "optim.lr"),
    (load_standin_recipe, "weight_decay", "optim.weight_decay"),
    (load_standin_recipe, "grad_clip", "optim.grad_clip"),
])
def test_every_optimiser_key_moved_under_optim(load, old, new):
    """One key per optimiser setting in every recipe that trains: its ``optim`` section."""
    with pytest.raises(ConfigError, match=f"^override: key '{old}' was renamed to '{new}'$"):
        load(None, [f"{old}=1e-3"])
    cfg = load(None, [f"{new}=1e-3"])  # the new key reads what the old one did
    section = cfg
    for part in new.split(".")[:-2]:  # the section that holds ``optim``
        section = getattr(section, part)
    assert getattr(section.optim, new.rsplit(".", 1)[1]) == 1e-3


DISTILL_LABELS = ["data.labels.folder=labels"]  # a distill recipe without a teacher needs its labels


def test_every_recipe_names_its_teacher_with_one_dataclass_and_the_same_keys():
    run = load_run_recipe(QUICKSTART, ["teacher.iters=3"])
    distill = load_recipe(RECIPES / "distill.yaml", ["teacher.iters=3"])
    prune = load_prune_config(RECIPES / "prune_to_budget.yaml", ["teacher.iters=3", "teacher.checkpoint=preset:tiny"])
    for cfg in (run, distill, prune):
        assert type(cfg.teacher) is TeacherRef and cfg.teacher.iters == 3
    assert prune.teacher.checkpoint == "preset:tiny"
    train = run.teacher.train  # the quick start's stand-in training, were it asked for
    assert run.teacher.stand_in == "shipped" and (train.preset, train.steps, train.batch_size) == (
        "quickstart_teacher", 120, 4)
    assert train.optim.lr == 2e-3 and train.optim.schedule == "one_cycle"  # the stand-in's optimiser, its lr set
    assert load_run_recipe(None).teacher.stand_in == "shipped"  # the run's default stand-in
    # the distill recipe's labels sit where the run recipe's do, with their folder
    assert distill.data.labels.folder == "runs/labels/fsd_teacher" and distill.data.labels.prob == "topk"
    same = ["data.labels.prob=topk", "data.labels.prob_topk=8", "data.labels.feature_levels=[0,1]"]
    assert distill.data.labels.content_key() == load_run_recipe(None, same).data.labels.content_key()


def test_the_stand_in_trains_in_the_words_of_the_stand_in_recipe():
    words = {f.name for f in dataclasses.fields(StandInTraining)}
    assert words == {"preset", "overrides", "steps", "batch_size", "optim"}
    assert issubclass(StandInRecipe, StandInTraining) and words < {f.name for f in dataclasses.fields(StandInRecipe)}
    run = load_run_recipe(None, ["teacher.train.steps=7", "teacher.train.batch_size=2", "teacher.train.preset=tiny"])
    standin = load_standin_recipe(None, ["steps=7", "batch_size=2", "preset=tiny"])
    assert {w: getattr(run.teacher.train, w) for w in words - {"optim"}} == {
        w: getattr(standin, w) for w in words - {"optim"}}
    with pytest.raises(ConfigError, match=r"^teacher\.train\.steps=0: expected an integer >= 1"):
        load_run_recipe(None, ["teacher.train.steps=0"])
    with pytest.raises(ConfigError, match=r"^steps=0: expected an integer >= 1"):
        load_standin_recipe(None, ["steps=0"])


@pytest.mark.parametrize("load, extra, old, value, new, read", [
    (load_run_recipe, [], "teacher.fallback_preset", "tiny", "teacher.train.preset", "tiny"),
    (load_run_recipe, [], "teacher.fallback_overrides", "{iters: 2}", "teacher.train.overrides", {"iters": 2}),
    (load_run_recipe, [], "teacher.train_steps", "5", "teacher.train.steps", 5),
    (load_run_recipe, [], "teacher.train_batch_size", "2", "teacher.train.batch_size", 2),
    (load_run_recipe, [], "teacher.optim", "{lr: 0.1}", "teacher.train.optim", None),
    (load_recipe, DISTILL_LABELS, "teacher.label_cache", "labels", "data.labels.folder", "labels"),
    (load_recipe, DISTILL_LABELS, "teacher.build_cache", "false", "data.labels.build", False),
    (load_recipe, DISTILL_LABELS, "teacher.cache", "{prob: topk}", "data.labels", None),
    (load_recipe, DISTILL_LABELS, "teacher.allow_random_init", "true", "teacher.stand_in=random", "random"),
    (load_prune_config, [], "teacher", "preset:tiny", "teacher.checkpoint", "preset:tiny"),
    (load_prune_config, [], "teacher_iters", "2", "teacher.iters", 2),
])
def test_the_old_teacher_keys_name_their_new_ones(tmp_path, load, extra, old, value, new, read):
    with pytest.raises(ConfigError, match=f"^override: key '{old}' was renamed to '{new}'$"):
        load(None, [*extra, f"{old}={value}"])
    recipe = tmp_path / "recipe.yaml"
    *parents, leaf = old.split(".")
    recipe.write_text(f"{''.join(p + ': {' for p in parents)}{leaf}: {value}{'}' * len(parents)}\n")
    with pytest.raises(ConfigError, match=f"{recipe}: key '{old}' was renamed to '{new}'$"):
        load(recipe, extra)
    key, _, new_value = new.partition("=")  # the new key reads what the old one did
    got = load(None, [*extra, f"{key}={new_value or value}"])
    for part in key.split("."):
        got = getattr(got, part)
    if read is None:  # a section: the given field
        field, given = next(iter(yaml.safe_load(value).items()))
        assert getattr(got, field) == given
    else:
        assert got == read


def test_a_teacher_section_is_not_taken_for_the_old_path(tmp_path):
    recipe = tmp_path / "prune.yaml"
    recipe.write_text("teacher: {checkpoint: preset:tiny, iters: 2}\n")
    assert load_prune_config(recipe).teacher == TeacherRef(checkpoint="preset:tiny", iters=2)
    assert load_prune_config(None, ["teacher={checkpoint: preset:tiny}"]).teacher.checkpoint == "preset:tiny"
    recipe.write_text("teacher: null\n")  # the old default, written out
    with pytest.raises(ConfigError, match="key 'teacher' was renamed to 'teacher.checkpoint'$"):
        load_prune_config(recipe)


@pytest.mark.parametrize("load, overrides, message", [
    (load_run_recipe, ["teacher.stand_in=random"], "ffsc run takes 'shipped' or 'train' or a saved student folder"),
    (load_recipe, [*DISTILL_LABELS, "teacher.stand_in=shipped"], "ffsc distill takes 'random'$"),
    (load_recipe, [*DISTILL_LABELS, "teacher.stand_in=runs/standin"], "ffsc distill takes 'random'$"),
    (load_recipe, [*DISTILL_LABELS, "teacher.train.steps=5"], "ffsc distill trains no stand-in teacher"),
    (load_prune_config, ["teacher.stand_in=shipped"], r"ffsc prune takes no stand-in \(set teacher.checkpoint\)$"),
    (load_prune_config, ["teacher.train.steps=5"], "ffsc prune trains no stand-in teacher"),
])
def test_a_teacher_setting_a_command_has_no_use_for_is_refused_in_one_line(load, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load(None, overrides)
    assert len(str(err.value).splitlines()) == 1


def test_the_teacher_config_is_a_cfg_yaml_or_its_fields():
    assert TeacherRef(config="weights/cfg.yaml").architecture() == "weights/cfg.yaml"
    arch = load_recipe(None, [*DISTILL_LABELS, "teacher.config.vit_size=vitt", "teacher.config.max_disp=64"])
    assert arch.teacher.architecture().vit_size == "vitt" and arch.teacher.architecture().max_disp == 64
    assert TeacherRef(config={}).config is None  # no fields: the cfg.yaml beside the checkpoint
    with pytest.raises(ConfigError, match="^teacher.config: got 3, expected a cfg.yaml path or a mapping"):
        load_run_recipe(None, ["teacher.config=3"])
    with pytest.raises(ConfigError, match="^teacher.config {'vit_sise': 'vitt'}: "):
        TeacherRef(config={"vit_sise": "vitt"}).architecture()


def test_records_written_before_the_renames_read_in_todays_keys():
    distill = translate_renamed(DistillConfig, {
        "teacher.label_cache": "labels", "teacher.build_cache": False, "teacher.cache.prob": "topk",
        "teacher.cache.iters": 4, "teacher.allow_random_init": True, "teacher.init_seed": 3, "steps": 9})
    assert distill == {"data.labels.folder": "labels", "data.labels.build": False, "data.labels.prob": "topk",
                       "teacher.iters": 4, "teacher.stand_in": "random", "teacher.init_seed": 3, "steps": 9}
    assert "teacher.stand_in" not in translate_renamed(DistillConfig, {"teacher.allow_random_init": False})
    run = translate_renamed(RunRecipe, {"teacher.train_steps": "120", "teacher.optim.lr": "0.002",
                                        "teacher.train.steps": "7", "teacher.fallback_preset": "tiny"})
    assert run == {"teacher.train.steps": "7", "teacher.train.optim.lr": "0.002", "teacher.train.preset": "tiny"}
    # a prune record of a run, from before the prune config's teacher was a section: the same key as today's
    old = {**PruneConfig(ratio=0.3).to_dict(), "teacher": None, "teacher_iters": 2}
    assert prune_key(old) == prune_key(PruneConfig(ratio=0.3, teacher=TeacherRef(iters=2)).to_dict())


def test_a_recipe_record_written_before_the_teacher_renames_loads_in_todays_keys(tmp_path):
    """benchmarks/quickstart.py --finished reads old run directories' recipe.yaml with load_record."""
    plain = to_plain(load_run_recipe(None, ["teacher.stand_in=train", "teacher.train.steps=120"]))
    teacher = plain["teacher"]
    train = teacher.pop("train")
    old = {**plain, "teacher": {**teacher, "train_steps": train["steps"], "train_batch_size": 3,
                                "fallback_preset": "tiny", "fallback_overrides": {}, "optim": train["optim"]}}
    record = tmp_path / "recipe.yaml"
    record.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="renamed to 'teacher.train"):
        load_run_recipe(record)
    recipe = load_record(RunRecipe, record, "recorded recipe")
    assert (recipe.teacher.stand_in, recipe.teacher.train.steps, recipe.teacher.train.batch_size,
            recipe.teacher.train.preset) == ("train", 120, 3, "tiny")
    assert recipe.teacher.train.optim.lr == train["optim"]["lr"]
    assert recipe.search == load_run_recipe(None).search  # everything else as recorded
