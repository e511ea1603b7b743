"""Bad graph files and model names: one GraphError naming the file, the field and the value (issue 11)."""
import re

import pytest

from ktg_fast.graph import Graph, GraphError, Node
from ktg_fast.models import canonical_model_name, get_model, is_model
from ktg_fast.models.registry import MAX_RESNET_DEPTH, MAX_WRN_DEPTH, MAX_WRN_WIDEN

GOOD = """\
temperature: 1.0
target: 1
nodes:
  - {model: resnet8}
  - {model: resnet8}
gates:
  - [cutoff, through, through]
  - [cutoff, cutoff, through]
  - [cutoff, through, cutoff]
"""


def load_error(tmp_path, text, name="g.yaml") -> str:
    """Write ``text`` (str or bytes) to ``name``; return its loading's GraphError message, less the path."""
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    with pytest.raises(GraphError) as info:
        Graph.load(p)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback
    msg = str(info.value)
    assert msg.startswith(f"{p}: "), msg  # names the file
    assert "\n" not in msg, msg  # one line
    return msg[len(f"{p}: "):]  # the rest, so that words of the test's folder name cannot match


def test_good_file_loads(tmp_path):
    (tmp_path / "g.yaml").write_text(GOOD)
    g = Graph.load(tmp_path / "g.yaml")
    assert g.target == 1 and g.temperature == 1.0 and g.gates[0] == ["cutoff", "through", "through"]


def test_relative_checkpoint_paths_are_read_from_the_graph_files_folder(tmp_path, monkeypatch):
    """``checkpoint: t.pt`` beside ``g.yaml`` is found from any working folder; the graph keeps the path as
    written (and a run's fingerprint with it)."""
    import torch

    from ktg_fast.nodes import TeacherNotFoundError, build_nodes, save_model_checkpoint

    folder = tmp_path / "graphs"
    folder.mkdir()
    save_model_checkpoint(folder / "t.pt", get_model("resnet8", num_classes=10), name="resnet8", num_classes=10,
                          in_channels=3)
    text = GOOD.replace("  - {model: resnet8}\n  - {model: resnet8}\n",
                        "  - {model: resnet8, checkpoint: t.pt}\n  - {model: resnet8}\n")
    (folder / "g.yaml").write_text(text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    g = Graph.load(folder / "g.yaml")
    assert g.to_dict()["nodes"][0] == {"model": "resnet8", "checkpoint": "t.pt"}  # as written
    nets = build_nodes(g, num_classes=10, in_channels=3, dataset="synthetic", device=torch.device("cpu"))
    want = torch.load(folder / "t.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(nets[0].state_dict()[k], v) for k, v in want.items())
    bare = Graph.from_dict(g.to_dict())  # no file: relative to the working folder, which lacks it
    with pytest.raises(TeacherNotFoundError, match=r"checkpoint t.pt not found"):
        build_nodes(bare, num_classes=10, in_channels=3, dataset="synthetic", device=torch.device("cpu"))


# ----------------------------------------------------------------- item 6 / 26: gates
@pytest.mark.parametrize("value", ["1.7", "1.0", "true", "yes", "on", "no"])
def test_gate_float_or_boolean_refused(tmp_path, value):
    """1.7 was truncated to through, yes/true read as code 1 (through), no/off as 0 (cutoff)."""
    msg = load_error(tmp_path, GOOD.replace("[cutoff, through, through]", f"[cutoff, {value}, through]"))
    assert "gate[0][1]" in msg
    if value[0].isdigit():
        assert value in msg and "integer" in msg
    else:
        assert "boolean" in msg and "yes/no" in msg
    assert "through" in msg and "cutoff" in msg  # the fix: the gate names


def test_gate_float_refused_in_json_and_library(tmp_path):
    p = tmp_path / "g.json"
    p.write_text('{"nodes": ["resnet8"], "gates": [[0, 1.7], [0, 0]]}')
    with pytest.raises(GraphError, match=r"g\.json: gate\[0\]\[1\].*1\.7"):
        Graph.load(p)
    with pytest.raises(GraphError, match=r"gate\[0\]\[1\].*2\.5"):
        Graph([Node("resnet8")], [[0, 2.5], [0, 0]])
    # Integer codes stay accepted.
    assert Graph([Node("resnet8")], [[0, 1], [0, 0]]).gates == [["cutoff", "through"], ["cutoff", "cutoff"]]


# ------------------------------------------------------------ item 6: temperature
@pytest.mark.parametrize("value,shown", [(".inf", "inf"), ("inf", "'inf'"), (".nan", "nan"), ("-.inf", "-inf")])
def test_temperature_not_finite_refused(tmp_path, value, shown):
    msg = load_error(tmp_path, GOOD.replace("temperature: 1.0", f"temperature: {value}"))
    assert "temperature" in msg and shown in msg and "finite" in msg


def test_temperature_infinite_refused_in_json_and_library(tmp_path):
    p = tmp_path / "g.json"
    p.write_text('{"temperature": Infinity, "nodes": ["resnet8"], "gates": [[0, 1], [0, 0]]}')
    with pytest.raises(GraphError, match=r"g\.json: temperature .*inf"):
        Graph.load(p)
    with pytest.raises(GraphError, match=r"temperature .*inf"):
        Graph([Node("resnet8")], [[0, 1], [0, 0]], temperature=float("inf"))


def test_temperature_exponent_without_dot_is_a_number(tmp_path):
    """YAML 1.1 reads 1e-1 as a string; graph files read it as the number (and round-trip 1e-05)."""
    (tmp_path / "g.yaml").write_text(GOOD.replace("temperature: 1.0", "temperature: 1e-1"))
    assert Graph.load(tmp_path / "g.yaml").temperature == 0.1
    g = Graph([Node("resnet8")], [[0, 1], [0, 0]], temperature=1e-5)
    assert Graph.load(g.save(tmp_path / "h.yaml")) == g


# -------------------------------------------------------------- item 10: wrong types
@pytest.mark.parametrize(
    "old,new,needles",
    [
        ("nodes:\n  - {model: resnet8}\n  - {model: resnet8}\n", "nodes: 5\n", ["nodes", "list", "5"]),
        ("target: 1", "target: null", ["target", "null"]),
        ("target: 1", "target: one", ["target", "'one'", "integer"]),
        ("temperature: 1.0", "temperature: [1]", ["temperature", "[1]", "number"]),
        ("temperature: 1.0", "temperature: hot", ["temperature", "'hot'", "number"]),
        ("temperature: 1.0", "temperature: '2'", ["temperature", "'2'", "number"]),
        ("temperature: 1.0", "temperature: null", ["temperature", "null"]),
        ("temperature: 1.0", "temperature: true", ["temperature", "boolean"]),
        ("  - [cutoff, through, through]\n", "  - cutoff\n", ["gates", "row 0", "'cutoff'"]),
    ],
)
def test_wrong_types_name_the_field(tmp_path, old, new, needles):
    assert old in GOOD
    msg = load_error(tmp_path, GOOD.replace(old, new))
    for needle in needles:
        assert needle in msg, msg


def test_gates_not_a_list(tmp_path):
    msg = load_error(tmp_path, GOOD.split("gates:")[0] + "gates: 3\n")
    assert "gates" in msg and "3" in msg and "list of rows" in msg


@pytest.mark.parametrize(
    "node,needles",
    [
        ("{model: 8}", ["node 2", "model", "8", "name"]),
        ("{model: null}", ["node 2", "model", "null"]),
        ("{model: resnet8, checkpoint: 5}", ["node 2", "checkpoint", "5", "path"]),
        ("{model: resnet8, checkpoint: yes}", ["node 2", "checkpoint", "boolean"]),
        ("{model: resnet8, checkpoint: ''}", ["node 2", "checkpoint", "''"]),
        ("{model: resnet8, lr: 0.1}", ["node 2", "unknown keys ['lr']"]),
        ("[resnet8]", ["node 2", "[", "mapping"]),
        ("7", ["node 2", "7", "mapping"]),
        ("{checkpoint: a.pt}", ["node 2", "'model'"]),
    ],
)
def test_node_fields_of_wrong_type(tmp_path, node, needles):
    msg = load_error(tmp_path, GOOD.replace("  - {model: resnet8}\ngates", f"  - {node}\ngates"))
    for needle in needles:
        assert needle in msg, msg


def test_node_types_checked_in_library_too():
    with pytest.raises(GraphError, match=r"node 1: model must be .*got 8"):
        Graph([Node(8)], [[0, 1], [0, 0]])  # type: ignore[arg-type]
    with pytest.raises(GraphError, match=r"node 1: unknown keys \['lr'\]"):
        Graph([{"model": "resnet8", "lr": 0.1}], [[0, 1], [0, 0]])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "data,needles",
    [
        (bytes(range(256)), ["not a UTF-8 text file", "byte 0x80", "128"]),
        (b"\x89PNG\r\n\x1a\n\x00\x00", ["not a UTF-8 text file", "0x89"]),
        (b"nodes: [a\x00b]\n", ["not a YAML text file", "#x0000"]),
        ("nodes: [resnet32\ngates: [", ["cannot parse", "line"]),
    ],
)
def test_binary_or_unparsable_file(tmp_path, data, needles):
    msg = load_error(tmp_path, data)
    for needle in needles:
        assert needle in msg, msg


def test_binary_json_file(tmp_path):
    msg = load_error(tmp_path, b"\xff\xfe\x00garbage", name="g.json")
    assert "not a UTF-8 text file" in msg
    msg = load_error(tmp_path, '{"nodes": [}', name="g.json")
    assert "cannot parse" in msg and "line 1" in msg


# ------------------------------------------------- item 26: indices and duplicates
@pytest.mark.parametrize("value,needles", [("1.7", ["1.7", "integer"]), ("1.0", ["1.0", "integer"]),
                                           ("true", ["boolean"]), ("yes", ["boolean"]), ("'1'", ["'1'", "integer"])])
def test_target_not_an_integer_refused(tmp_path, value, needles):
    msg = load_error(tmp_path, GOOD.replace("target: 1", f"target: {value}"))
    assert "target" in msg
    for needle in needles:
        assert needle in msg, msg


def test_target_not_an_integer_refused_in_library():
    with pytest.raises(GraphError, match=r"target .*1\.7"):
        Graph([Node("resnet8")], [[0, 1], [0, 0]], target=1.7)  # type: ignore[arg-type]
    with pytest.raises(GraphError, match=r"target .*boolean"):
        Graph([Node("resnet8")], [[0, 1], [0, 0]], target=True)


@pytest.mark.parametrize(
    "text,key,line",
    [
        (GOOD + "target: 2\n", "target", 10),
        (GOOD.replace("{model: resnet8}\ngates", "{model: resnet8, model: wrn16_2}\ngates"), "model", 5),
        (GOOD.replace("temperature: 1.0\n", "temperature: 1.0\ntemperature: 4\n"), "temperature", 2),
    ],
)
def test_duplicate_keys_refused(tmp_path, text, key, line):
    msg = load_error(tmp_path, text)
    assert f"duplicate key {key!r}" in msg and f"line {line}" in msg, msg


def test_duplicate_keys_refused_in_json(tmp_path):
    msg = load_error(tmp_path, '{"nodes": ["resnet8"], "gates": [[0, 1], [0, 0]], "target": 1, "target": 2}',
                     name="g.json")
    assert "duplicate key 'target'" in msg


def test_yaml_merge_keys_still_work(tmp_path):
    """A merge key (<<) overridden by an explicit key is no duplicate."""
    text = GOOD.replace("  - {model: resnet8}\n  - {model: resnet8}\n",
                        "  - &b {model: resnet8}\n  - {<<: *b, model: resnet20}\n")
    (tmp_path / "g.yaml").write_text(text)
    assert [n.model for n in Graph.load(tmp_path / "g.yaml").nodes] == ["resnet8", "resnet20"]


# --------------------------------------------------------- item 7: registry bounds
@pytest.mark.parametrize(
    "name,limit",
    [
        ("resnet99999998", str(MAX_RESNET_DEPTH)),
        ("resnet" + "9" * 5000, str(MAX_RESNET_DEPTH)),  # int() of 5000 digits would fail cryptically
        (f"wrn{MAX_WRN_DEPTH + 6}_2", str(MAX_WRN_DEPTH)),
        (f"wrn28_{MAX_WRN_WIDEN + 1}", str(MAX_WRN_WIDEN)),
        ("wrn1000000_1000000", str(MAX_WRN_DEPTH)),
    ],
)
def test_model_size_bounded(name, limit):
    with pytest.raises(ValueError) as info:
        canonical_model_name(name)
    msg = str(info.value)
    assert limit in msg and "at most" in msg and "register_model" in msg and len(msg) < 400, msg
    assert not is_model(name)
    with pytest.raises(ValueError, match="at most"):
        get_model(name, num_classes=10)


def test_model_size_limits_allow_the_papers_models():
    for name in (f"resnet{MAX_RESNET_DEPTH}", "wrn28_10", f"wrn{MAX_WRN_DEPTH}_{MAX_WRN_WIDEN}", "wrn40_2"):
        assert is_model(name), name


def test_graph_file_with_huge_model_refused(tmp_path):
    msg = load_error(tmp_path, GOOD.replace("{model: resnet8}\ngates", "{model: resnet99999998}\ngates"))
    assert "node 2" in msg and "resnet99999998" in msg and str(MAX_RESNET_DEPTH) in msg


# ------------------------------------------------- item 20: the patterns once
def test_unknown_model_error_lists_patterns_once(tmp_path):
    from ktg_fast.search.space import SearchError, SearchSpace

    msgs = [load_error(tmp_path, GOOD.replace("{model: resnet8}\ngates", "{model: vgg16}\ngates"))]
    with pytest.raises(SearchError) as info:
        SearchSpace(nodes=2, target="vgg16")
    msgs.append(str(info.value))
    with pytest.raises(KeyError) as info:
        get_model("vgg16", num_classes=10)
    msgs.append(str(info.value))
    for msg in msgs:
        assert "'vgg16'" in msg
        assert len(re.findall(r"resnet\{6n\+2\}", msg)) == 1, msg
        assert len(re.findall(r"wrn\{6n\+4\}_\{k\}", msg)) == 1, msg


def test_bad_depth_reason_given_not_unknown_model(tmp_path):
    """resnet33 matches a pattern but has a bad depth: say so rather than listing the known names."""
    msg = load_error(tmp_path, GOOD.replace("{model: resnet8}\ngates", "{model: resnet33}\ngates"))
    assert "node 2" in msg and "must be 6n+2" in msg and "unknown" not in msg, msg
