"""wanx.config: hostile YAML files, wrongly typed values and out-of-range numbers are refused on one line."""
import pytest

from wanx.config import MAX_CONFIG_BYTES, ConfigError, load_config

TINY = "configs/tiny.yaml"


def refusal(path=None, overrides=(), settings=None) -> str:
    """The one-line message of the ConfigError that loading raises."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), settings)
    message = str(info.value)
    assert "\n" not in message
    return message


# name: (file content as bytes, a fragment of the reason)
HOSTILE_FILES = {
    "a list at the top": (b"- model\n- sampler\n", "mapping"),
    "a scalar at the top": (b"42\n", "mapping"),
    "a python tag": (b"sampler: !!python/object/apply:os.system ['echo owned']\n", "not valid YAML"),
    "a syntax error": (b"sampler: {steps: 3\n", "not valid YAML"),
    "tabs for indentation": (b"sampler:\n\tsteps: 3\n", "not valid YAML"),
    "duplicate keys": (b"sampler:\n  steps: 3\n  steps: 4\n", "duplicate key 'steps'"),
    "duplicate sections": (b"sampler: {steps: 3}\nsampler: {steps: 4}\n", "duplicate key 'sampler'"),
    "bad UTF-8": (b"negative_prompt: \"\xff\xfe\"\n", "not UTF-8"),
    "an alias bomb": (b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                      b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", "anchors and aliases"),
    "an unknown section": (b"samplr:\n  steps: 3\n", "unknown key 'samplr'"),
    "a section that is a number": (b"sampler: 3\n", "must be a section"),
    "a string for a boolean": (b"offload_text_encoder: 'yes'\n", "offload_text_encoder must be true or false"),
    "an integer for a boolean": (b"video:\n  vae_tiling: 1\n", "video.vae_tiling must be true or false"),
    "a float for an integer": (b"sampler:\n  steps: 3.0\n", "sampler.steps must be an integer"),
    "a boolean for a number": (b"sampler:\n  guidance: true\n", "sampler.guidance must be a number"),
    "a list of strings for the size": (b"video:\n  size: [a, b]\n", "video.size[0] must be an integer"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_hostile_config_files_are_refused_on_one_line(case, tmp_path):
    content, reason = HOSTILE_FILES[case]
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    message = refusal(str(path))
    assert reason in message
    if case != "an unknown section" and case not in ("a string for a boolean",):
        assert "config.yaml" in message or "bad configuration" in message


def test_the_error_names_the_line_of_a_yaml_mistake(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  kind: tiny\nsampler:\n\tsteps: 3\n")
    assert "line 4" in refusal(str(path))


def test_an_oversized_config_is_refused_before_parsing(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"# " + b"x" * MAX_CONFIG_BYTES + b"\n")
    assert "larger than" in refusal(str(path))


def test_a_folder_as_config_is_refused(tmp_path):
    assert "not a file" in refusal(str(tmp_path))


def test_an_empty_config_file_means_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(str(path)).sampler.steps == 32


@pytest.mark.parametrize("override, reason", [
    ("sampler.shift=inf", "sampler.shift must be a number"),
    ("sampler.shift=.inf", "sampler.shift must be a finite number"),
    ("sampler.shift=.nan", "sampler.shift must be a finite number"),
    ("sampler.shift=0", "sampler.shift"),
    ("sampler.guidance=-.inf", "sampler.guidance must be a finite number"),
    ("sampler.guidance=1e300", "sampler.guidance"),
    ("sampler.steps=0", "sampler.steps must be in"),
    ("sampler.steps=-3", "sampler.steps must be in"),
    ("sampler.steps=100000", "sampler.steps must be in"),
    ("sampler.seed=-1", "sampler.seed must be in"),
    ("sampler.seed=99999999999999999999999", "sampler.seed must be in"),
    ("model.seed=-5", "model.seed must be in"),
    ("sampler.num_train_timesteps=0", "sampler.num_train_timesteps"),
    ("video.fps=.inf", "video.fps must be a number in"),
    ("video.fps=0.001", "video.fps must be a number in"),
    ("video.fps=1e9", "video.fps must be a number in"),
    ("video.max_frames=0", "video.max_frames must be in"),
    ("video.max_frames=10000000", "video.max_frames must be in"),
    ("video.bucket_scale=.inf", "video.bucket_scale"),
    ("video.size=[1048576,16]", "video.size"),
    ("attention.block_size=0", "attention: ISAConfig.block_size"),
    ("device=cuda:x", "device must be"),
    ("device=cuda:0:1", "device must be"),
    ("device=gpu", "device must be"),
    ("offload_text_encoder=yes", "offload_text_encoder must be true or false"),
    ("offload_text_encoder=1", "offload_text_encoder must be true or false"),
    ("video.vae_tiling=on", "video.vae_tiling must be true or false"),
    ("sampler.steps=3.5", "sampler.steps must be an integer"),
    ("sampler.steps=true", "sampler.steps must be an integer"),
    ("model.checkpoint=''", "model.checkpoint must be a path"),
    ("sampler.steps", "key=value"),
    ("=3", "key=value"),
    ("sampler..steps=3", "key=value"),
    ("sampler.steps=[1, 2", "not valid YAML"),
    ("sampler=&a {steps: 3}", "anchors and aliases"),
])
def test_out_of_range_and_wrongly_typed_values_are_refused(override, reason):
    assert reason in refusal(TINY, [override])


@pytest.mark.parametrize("settings, reason", [
    ({"sampler.steps": -1}, "sampler.steps must be in"),
    ({"sampler.seed": 2**70}, "sampler.seed must be in"),
    ({"sampler.guidance": float("nan")}, "sampler.guidance must be a finite number"),
    ({"video.max_frames": 0}, "video.max_frames must be in"),
])
def test_flag_values_are_checked_like_the_file(settings, reason):
    assert reason in refusal(TINY, settings=settings)


def test_valid_extremes_are_accepted():
    cfg = load_config(TINY, ["sampler.seed=18446744073709551615", "sampler.steps=1", "video.fps=120",
                             "sampler.guidance=0", "device=cuda:1", "video.vae_tiling=false"])
    assert cfg.sampler.seed == 2**64 - 1 and cfg.video.fps == 120.0


def test_interpolations_still_resolve():
    cfg = load_config("inference.yaml", ["model.wan_dir=/weights/wan"])
    assert cfg.model.vae == "/weights/wan/Wan2.1_VAE.pth"


def test_an_empty_override_value_is_an_empty_string():
    assert load_config(TINY, ["negative_prompt="]).negative_prompt == ""


def test_the_memory_section_defaults_to_auto_with_nothing_fixed():
    memory = load_config(TINY).memory
    assert (memory.profile, memory.offload, memory.weights, memory.guidance) == ("auto", None, None, None)
    cfg = load_config(TINY, ["memory.profile=manual", "memory.offload=blocks", "memory.weights=fp8",
                             "memory.guidance=sequential"])
    assert (cfg.memory.offload, cfg.memory.weights, cfg.memory.guidance) == ("blocks", "fp8", "sequential")


@pytest.mark.parametrize("overrides, reason", [
    (["memory.offload=disk"], "memory.offload must be one of none, model, blocks (or null: the profile picks), "
                              "got 'disk'"),
    (["memory.weights=int4"], "memory.weights must be one of bf16, fp8"),
    (["memory.guidance=parallel"], "memory.guidance must be one of batch, sequential"),
    (["memory.profile=fastest"], "memory.profile must be one of auto, manual, got 'fastest'"),
    (["memory.offload=1"], "memory.offload must be a string, got integer 1"),
    (["memory.margin=0.2"], "unknown key 'memory.margin'"),
    (["memory.guidance=sequential", "parallel.cfg_degree=2"],
     "memory.guidance sequential cannot be combined with parallel.cfg_degree 2"),
    (["memory.weights=fp8", "parallel.ulysses_degree=2"],
     "memory.weights=fp8: under several processes only offload none, weights bf16 and guidance batch run"),
])
def test_bad_memory_settings_are_refused_on_one_line(overrides, reason):
    assert reason in refusal(TINY, overrides)


@pytest.mark.parametrize("override, reason", [
    ("sampler.seed=1:30", "sampler.seed must be an integer"),  # YAML 1.1 would read 90
    ("sampler.seed=0x40", "sampler.seed must be an integer"),
    ("sampler.steps=1_0", "sampler.steps must be an integer"),
    ("model={[1]: 2}", "a key must be a plain name"),
    ("sampler.seed=" + "9" * 5000, "cannot be read"),
    ("model.vae=${oc.env:HOME}", "not a plain reference"),
    ("parallel.shard_weights=true", "needs several processes"),
])
def test_yaml_1_1_surprises_unhashable_keys_huge_numbers_and_resolvers_are_refused(override, reason):
    assert reason in refusal(TINY, [override])


def test_flag_values_are_verbatim_text_even_with_a_dollar_brace():
    cfg = load_config(TINY, settings={"negative_prompt": "blurry, ${x}"})
    assert cfg.negative_prompt == "blurry, ${x}"
