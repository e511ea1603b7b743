"""Graph files, validation messages, presets and drawings."""
import shutil

import pytest
import torch

import ktg_fast as kf
from ktg_fast.graph import PRETRAINED, Graph, GraphError, Node, load_graph, preset


def three_node():
    return Graph(
        [Node("resnet32"), Node("wrn28_2", "teachers/x.pt"), Node("resnet110")],
        [
            ["cutoff", "through", "cutoff", "linear"],
            ["cutoff", "cutoff", "cutoff", "correct"],
            ["cutoff", "through", "cutoff", "through"],
            ["cutoff", "linear", "cutoff", "cutoff"],
        ],
        temperature=1.5,
    )


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_round_trip_exact(tmp_path, suffix):
    g = three_node()
    path = g.save(tmp_path / f"g{suffix}")
    h = Graph.load(path)
    assert h == g
    assert h.to_dict() == g.to_dict()
    # Saving again gives byte-identical text.
    assert h.dumps("yaml" if suffix != ".json" else "json") == path.read_text()


def test_frozen_and_trainable():
    g = three_node()
    assert g.frozen == [2]
    assert g.trainable == [1, 3]
    assert g.num_nodes == 3
    assert g.gate_codes().tolist()[0] == [0, 1, 0, 2]


def test_gate_codes_and_case_accepted():
    g = Graph([Node("resnet8")], [["cutoff", 1], ["CUTOFF", "cutoff"]])
    assert g.gates == [["cutoff", "through"], ["cutoff", "cutoff"]]


def bad(mutator, match):
    d = three_node().to_dict()
    mutator(d)
    with pytest.raises(GraphError, match=match):
        Graph.from_dict(d)


def test_validation_messages():
    bad(lambda d: d["gates"][1].__setitem__(2, "sometimes"), r"gate\[1\]\[2\]: unknown gate 'sometimes'")
    bad(lambda d: d["gates"][1].__setitem__(2, 7), r"gate\[1\]\[2\]: unknown gate 7; known gates \(name and integer "
                                                   r"code\): cutoff \(0\), through \(1\), linear \(2\), correct \(3\)$")
    bad(lambda d: d["gates"][1].__setitem__(2, 1.5), r"gate\[1\]\[2\]: 1.5 is not a gate: write a gate name or its "
                                                     r"integer code \(cutoff \(0\), through \(1\)")
    bad(lambda d: d["nodes"][2].__setitem__("model", "resnet1000x"), r"node 3: unknown model 'resnet1000x'")
    bad(lambda d: d["gates"].pop(), r"gate matrix must be 4x4 .*; got 3 rows$")
    bad(lambda d: d["gates"][1].pop(), r"gate matrix must be 4x4 .*; row 1 has 3 entries$")  # a ragged row named
    bad(lambda d: (d["gates"][1].pop(), d["gates"][3].append("cutoff")), r"; row 1 has 3 entries, row 3 has 5 entries$")
    bad(lambda d: d["gates"][2].__setitem__(2, "through"), r"gate\[2\]\[2\].*itself")
    bad(lambda d: d["gates"][3].__setitem__(0, "through"), r"gate\[3\]\[0\].*label")
    # Target frozen: cut every input of node 1.
    bad(lambda d: [r.__setitem__(1, "cutoff") for r in d["gates"]], r"target node 1 is frozen")
    # A frozen node without checkpoint.
    bad(lambda d: d["nodes"][1].pop("checkpoint"), r"node 2 \(wrn28_2\) is frozen but has no checkpoint")
    bad(lambda d: d.__setitem__("temperature", 0), r"temperature must be a finite positive number.*got 0.0")
    bad(lambda d: d.__setitem__("colour", "red"), r"unknown graph keys \['colour'\]")
    bad(lambda d: d["nodes"][0].__setitem__("lr", 3), r"node 1: unknown keys \['lr'\]")
    bad(lambda d: d.__setitem__("target", 7), r"target node 7 does not exist")


def test_file_errors_name_the_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("nodes: [resnet32\ngates: [")
    with pytest.raises(GraphError, match="broken.yaml: cannot parse"):
        Graph.load(p)
    p.write_text("nodes: [resnet32]\ngates: [[cutoff, through], [cutoff, nope]]\n")
    with pytest.raises(GraphError, match=r"broken.yaml: gate\[1\]\[1\]: unknown gate 'nope'"):
        Graph.load(p)
    with pytest.raises(GraphError, match="neither a graph preset"):
        load_graph(str(tmp_path / "missing.yaml"))
    with pytest.raises(GraphError, match="not found; give a preset name"):
        Graph.load(tmp_path / "missing.yaml")
    with pytest.raises(GraphError, match="unknown graph file suffix"):
        three_node().save(tmp_path / "g.txt")


def test_presets():
    v = preset("vanilla")
    assert v.num_nodes == 1 and v.gates == [["cutoff", "through"], ["cutoff", "cutoff"]]
    for n in (2, 3, 5):
        d = preset("dml", nodes=n)
        assert d.num_nodes == n and d.frozen == []
        for s in range(n + 1):
            for t in range(1, n + 1):
                assert d.gates[s][t] == ("cutoff" if s == t else "through")
    k = preset("kd")
    assert k.temperature == 2.0
    assert k.frozen == [2] and k.nodes[1].checkpoint == PRETRAINED
    assert k.gates[2][1] == "through" and k.gates[0][1] == "through" and k.gates[1][2] == "cutoff"
    mixed = preset("dml", models=["resnet32", "wrn28_2"])
    assert [n.model for n in mixed.nodes] == ["resnet32", "wrn28_2"]
    with pytest.raises(GraphError, match="unknown graph preset 'dlm'"):
        preset("dlm")


def test_dot_drawing(tmp_path):
    g = three_node()
    dot = g.to_dot(accuracies=[70.1, 74.6, 72.5])
    assert 'n1 [label="1: resnet32\\nval 70.1 %", fillcolor="#f4a6a6"' in dot  # target red, its figure and unit
    assert "(frozen)" in dot and "#a6c8f4" in dot  # frozen blue
    assert 'n0 -> n1 [label="through"]' in dot and 'n3 -> n1 [label="linear"]' in dot
    assert "n0 -> n2" not in dot  # cutoff edges left out
    assert dot.count("->") == sum(1 for s in range(4) for t in range(1, 4) if s != t and g.gates[s][t] != "cutoff")
    written = g.draw(tmp_path / "g")
    assert written[0].read_text() == dot.replace("\\nval 70.1 %", "").replace("\\nval 74.6 %", "").replace(
        "\\nval 72.5 %", "")
    if shutil.which("dot"):
        png = tmp_path / "g.png"
        assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_graph_drives_graph_loss():
    g = preset("dml", nodes=3)
    z = torch.randn(3, 4, 10, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    a = kf.graph_loss(z, y, g.gates)
    b = kf.graph_loss(z, y, g.gate_codes())
    torch.testing.assert_close(a.node_loss, b.node_loss)
