"""Topology YAML: validation (one test per kind of mistake, checking the key path in the message),
shipped examples, bundle checks against small random bundles, and `devit-mq check`."""

import copy
from pathlib import Path

import pytest
import yaml

from devit_mq.topology import (
    ATTENTION_BACKENDS,
    NodeSpec,
    Topology,
    TopologyError,
    UnknownNodeError,
    check_against_bundle,
    load_topology,
)
from devit_mq.topology.cli import main as check_main

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "topologies").glob("*.yaml"))

BASE = {
    "name": "t",
    "bundle": "b",
    "transport": "zmq",
    "codec": "int8",
    "aggregator": {"name": "aggregator", "host": "127.0.0.1", "port": 5600},
    "edges": [
        {"name": "edge0", "submodel": 0, "host": "127.0.0.1", "port": 5610},
        {"name": "edge1", "submodel": 1, "host": "127.0.0.1", "port": 5611},
    ],
}


def topo(**changes):
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def problems_of(data, **kw):
    with pytest.raises(TopologyError) as info:
        load_topology(data, check_bundle=False, **kw)
    return str(info.value)


# ---------------------------------------------------------------------------------------- valid


def test_valid_topology_types_defaults_and_order():
    t = load_topology(topo(edges=[BASE["edges"][1], BASE["edges"][0]], defaults={"threads": 2}),
                      check_bundle=False)
    assert isinstance(t, Topology)
    assert [e.name for e in t.edges] == ["edge0", "edge1"]  # sorted by sub-model
    assert [e.submodel for e in t.edges] == [0, 1]
    agg = t.aggregator
    assert (agg.role, agg.deadline_ms, agg.missing_policy, agg.max_pending) == ("aggregator", 1000.0, "degrade", 10000)
    assert all(n.threads == 2 for n in t.nodes)
    assert t.edges[0].deadline_ms is None and t.edges[0].missing_policy is None
    assert (t.codec, t.image_codec, t.transport) == ("int8", "raw", "zmq")
    assert t.limits.max_message_bytes == 16 * 1024 * 1024
    assert t.client is None
    # ranks: (no client) aggregator, then edges in *listed* order
    assert t.mpi_ranks() == {"aggregator": 0, "edge1": 1, "edge0": 2}
    assert [n.name for n in t.nodes] == ["aggregator", "edge1", "edge0"]


def test_node_value_wins_over_defaults_and_defaults_apply_by_role():
    data = topo(defaults={"max_batch": 4, "deadline_ms": 250, "missing_policy": "error", "attention": "numba"})
    data["edges"][1]["max_batch"] = 16
    t = load_topology(data, check_bundle=False)
    assert t.edge_for(0).max_batch == 4 and t.edge_for(1).max_batch == 16
    assert t.aggregator.deadline_ms == 250.0 and t.aggregator.missing_policy == "error"
    assert t.edge_for(0).deadline_ms is None
    assert t.edge_for(1).attention == "numba"


def test_endpoints_tcp_loopback_remote_ipc_and_bind_override(tmp_path):
    data = topo()
    data["aggregator"] = {"name": "aggregator", "host": "192.0.2.10", "port": 5600}
    data["edges"][0] = {"name": "edge0", "submodel": 0, "ipc": "sock/e0.sock"}
    data["edges"][1]["bind"] = "tcp://127.0.0.2:5611"
    t = load_topology(data, check_bundle=False, base_dir=tmp_path)
    assert t.aggregator.connect_endpoint == "tcp://192.0.2.10:5600"
    assert t.aggregator.bind_endpoint == "tcp://*:5600"  # a non-local host binds every interface
    e0, e1 = t.edges
    assert e0.connect_endpoint == e0.bind_endpoint == f"ipc://{tmp_path / 'sock/e0.sock'}"
    assert e1.connect_endpoint == "tcp://127.0.0.1:5611"
    assert e1.bind_endpoint == "tcp://127.0.0.2:5611"
    v6 = load_topology(topo(aggregator={"name": "aggregator", "host": "::1", "port": 5600}), check_bundle=False)
    assert v6.aggregator.connect_endpoint == v6.aggregator.bind_endpoint == "tcp://[::1]:5600"


def test_mpi_ranks_default_order_explicit_ranks_and_world_size():
    data = topo(transport="mpi", client={"name": "client"})
    for node in [data["aggregator"], *data["edges"]]:
        for key in ("host", "port"):
            node.pop(key)
    t = load_topology(data, check_bundle=False)
    assert t.mpi_ranks(4) == {"client": 0, "aggregator": 1, "edge0": 2, "edge1": 3}
    with pytest.raises(TopologyError, match=r"MPI started 3 rank\(s\) but topology 't' has 4 nodes.*mpirun -n 4"):
        t.mpi_ranks(3)
    data["edges"][1]["rank"] = 0  # explicit rank; the others fill the free ones in default order
    t = load_topology(data, check_bundle=False)
    assert t.mpi_ranks() == {"edge1": 0, "client": 1, "aggregator": 2, "edge0": 3}
    assert [n.name for n in t.nodes] == ["edge1", "client", "aggregator", "edge0"]


def test_node_lookup_names_known_nodes():
    t = load_topology(topo(), check_bundle=False)
    assert isinstance(t.node("edge1"), NodeSpec)
    with pytest.raises(UnknownNodeError, match="no node named 'edge9'.*aggregator, edge0, edge1") as info:
        t.node("edge9")
    assert isinstance(info.value, KeyError) and isinstance(info.value, TopologyError)


def test_to_dict_round_trips(tmp_path):
    data = topo(defaults={"threads": 3}, security={"curve": True, "keys_dir": "k"}, limits={"hwm": 5})
    data["edges"][0] = {"name": "edge0", "submodel": 0, "ipc": "e0.sock", "embed_dim": 32}
    t = load_topology(data, check_bundle=False, base_dir=tmp_path)
    again = load_topology(yaml.safe_load(yaml.safe_dump(t.to_dict())), check_bundle=False, base_dir=REPO)
    assert again == t


def test_attention_names_match_the_model_package():
    from devit_mq.model.config import ATTENTION_BACKENDS as MODEL_BACKENDS

    assert ATTENTION_BACKENDS == MODEL_BACKENDS


# -------------------------------------------------------------------------- one test per mistake

MISTAKES = {
    "unknown top-level key with suggestion": (
        lambda d: d.update(codek="fp16"), "codek: unknown key; did you mean 'codec'?"),
    "unknown node key with suggestion": (
        lambda d: d["edges"][0].update(thread=2), "edges[0].thread: unknown key; did you mean 'threads'?"),
    "unknown key without close match": (
        lambda d: d["aggregator"].update(colour="red"), "aggregator.colour: unknown key; known keys here:"),
    "role-specific key on the wrong role": (
        lambda d: d["edges"][1].update(deadline_ms=5), "edges[1].deadline_ms: 'deadline_ms' is not a setting of an "
                                                        "edge (only of: aggregator)"),
    "per-node key in defaults": (
        lambda d: d.update(defaults={"port": 1}), "defaults.port: 'port' is per node and cannot have a default"),
    "wrong type (string port)": (
        lambda d: d["edges"][0].update(port="5610"), "edges[0].port: expected an integer, got str '5610'"),
    "wrong type (bool is not int)": (
        lambda d: d["aggregator"].update(max_pending=True), "aggregator.max_pending: expected an integer, got bool"),
    "wrong type (edges not a list)": (
        lambda d: d.update(edges={"name": "edge0"}), "edges: expected a list of edges, got dict"),
    "wrong type (node not a mapping)": (
        lambda d: d["edges"].__setitem__(1, "edge1"), "edges[1]: expected a mapping, got str 'edge1'"),
    "wrong type (curve)": (
        lambda d: d.update(security={"curve": "yes please"}), "security.curve: expected true or false"),
    "missing required top-level key": (
        lambda d: d.pop("bundle"), "bundle: required key is missing"),
    "missing required node key": (
        lambda d: d["edges"][1].pop("submodel"), "edges[1].submodel: required key is missing"),
    "missing name": (
        lambda d: d["aggregator"].pop("name"), "aggregator.name: required key is missing"),
    "missing address": (
        lambda d: [d["edges"][0].pop(k) for k in ("host", "port")], "edges[0]: needs an address for ZeroMQ"),
    "port and ipc": (
        lambda d: d["edges"][0].update(ipc="/tmp/x.sock"), "edges[0].ipc: give either 'port' (with 'host') or "
                                                            "'ipc', not both"),
    "missing sub-model": (
        lambda d: d["edges"][1].update(submodel=2), "edges: no edge runs sub-model(s) 1 (edges run 0, 2)"),
    "two edges on one sub-model": (
        lambda d: d["edges"][1].update(submodel=0), "edges[1].submodel: sub-model 0 is already served by edges[0] "
                                                     "(edge0)"),
    "port clash": (
        lambda d: d["edges"][1].update(port=5610), "edges[1].port: 5610 clashes with edges[0].port"),
    "port clash through localhost": (
        lambda d: d["edges"][1].update(port=5600, host="localhost"), "edges[1].port: 5600 clashes with aggregator.port"),
    "ipc clash": (
        lambda d: [d["edges"][i].update(ipc="/tmp/devit-x.sock", port=None) or d["edges"][i].pop("port")
                   for i in (0, 1)], "edges[1].ipc: /tmp/devit-x.sock clashes with edges[0].ipc"),
    "duplicate names": (
        lambda d: d["edges"][1].update(name="aggregator"), "edges[1].name: 'aggregator' is already used by aggregator"),
    "bad name": (
        lambda d: d["edges"][1].update(name="edge 1/x"), "edges[1].name: 'edge 1/x' is not a valid node name"),
    "bad codec": (
        lambda d: d.update(codec="int4"), "codec: 'int4' is not one of fp32, fp16, bf16, int8, int8-block"),
    "bad transport": (
        lambda d: d.update(transport="zeromq"), "transport: 'zeromq' is not one of zmq, mpi"),
    "bad image codec": (
        lambda d: d.update(image_codec="png"), "image_codec: 'png' is not one of raw, jpeg"),
    "bad image quality": (
        lambda d: d.update(image_quality=100), "image_quality: must be <= 95, got 100"),
    "bad attention": (
        lambda d: d["edges"][0].update(attention="numbaa"), "edges[0].attention: 'numbaa' is not one of "
                                                             f"{', '.join(ATTENTION_BACKENDS)}; did you mean 'numba'?"),
    "bad policy": (
        lambda d: d["aggregator"].update(missing_policy="ignore"), "aggregator.missing_policy: 'ignore' is not one of "
                                                                   "degrade, error"),
    "role mismatch": (
        lambda d: d["edges"][0].update(role="aggregator"), "edges[0].role: 'aggregator' does not match this section"),
    "negative threads": (
        lambda d: d["edges"][0].update(threads=0), "edges[0].threads: must be >= 1, got 0"),
    "negative wait": (
        lambda d: d.update(defaults={"max_wait_ms": -1}), "defaults.max_wait_ms: must be >= 0, got -1.0"),
    "zero deadline": (
        lambda d: d["aggregator"].update(deadline_ms=0), "aggregator.deadline_ms: must be > 0, got 0.0"),
    "negative sub-model": (
        lambda d: d["edges"][0].update(submodel=-1), "edges[0].submodel: must be >= 0, got -1"),
    "port out of range": (
        lambda d: d["edges"][0].update(port=70000), "edges[0].port: must be <= 65535, got 70000"),
    "bad limit": (
        lambda d: d.update(limits={"max_message_bytes": 0}), "limits.max_message_bytes: must be >= 1, got 0"),
    "empty edges": (
        lambda d: d.update(edges=[]), "edges: needs at least one edge"),
    "mpi without client": (
        lambda d: d.update(transport="mpi"), "client: required key is missing: with transport 'mpi'"),
    "curve over mpi": (
        lambda d: d.update(transport="mpi", client={"name": "c"}, security={"curve": True}),
        "security.curve: CURVE secures ZeroMQ links"),
    "rank clash": (
        lambda d: [d["edges"][i].update(rank=1) for i in (0, 1)], "edges[1].rank: rank 1 is already taken by edges[0]"),
    "rank out of range": (
        lambda d: d["edges"][0].update(rank=3), "edges[0].rank: 3 is out of range: the topology has 3 nodes"),
    "ipc path too long": (
        lambda d: d["edges"][0].update(ipc="/tmp/" + "x" * 120, port=None) or d["edges"][0].pop("port"),
        "edges[0].ipc: '/tmp/xxx"),
    "bad bind": (
        lambda d: d["edges"][0].update(bind="0.0.0.0:5610"), "edges[0].bind: '0.0.0.0:5610' is not a ZeroMQ endpoint"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_every_mistake_is_reported_with_its_key_path(case):
    mutate, expected = MISTAKES[case]
    data = copy.deepcopy(BASE)
    mutate(data)
    assert expected in problems_of(data)


def test_all_problems_are_reported_at_once():
    data = topo(codec="int4")
    data["edges"][1].update(port=5610, thread=1)
    with pytest.raises(TopologyError) as info:
        load_topology(data, check_bundle=False)
    paths = [p for p, _ in info.value.problems]
    assert paths == ["codec", "edges[1].thread", "edges[1].port"]
    assert info.value.path == "codec"


def test_yaml_file_errors_name_the_file_and_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(TopologyError, match="nope.yaml does not exist"):
        load_topology(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(TopologyError, match="broken.yaml: not valid YAML"):
        load_topology(broken)
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: a\nbundle: b\nname: c\n")
    with pytest.raises(TopologyError, match=r"dup.yaml: line 3: duplicate key 'name' \(first on line 1\)"):
        load_topology(dup)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(TopologyError, match="scalar.yaml: a topology must be a mapping, got str"):
        load_topology(scalar)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(topo(codec="int4")))
    with pytest.raises(TopologyError, match=r"^.*bad.yaml: codec: 'int4'"):
        load_topology(bad, check_bundle=False)


# ------------------------------------------------------------------------------------- shipped


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_topologies_load(path):
    t = load_topology(path, check_bundle=False)
    assert t.name == path.stem
    assert [e.submodel for e in t.edges] == list(range(len(t.edges)))
    if t.transport == "mpi":
        assert t.client is not None and sorted(t.mpi_ranks(len(t.nodes)).values()) == list(range(len(t.nodes)))
    else:
        assert all(n.connect_endpoint for n in [t.aggregator, *t.edges])
    if (t.bundle / "manifest.json").is_file():  # the trained bundles may not be there yet
        load_topology(path)


def test_shipped_set_is_complete():
    names = {p.stem for p in SHIPPED}
    assert {"local-2edge", "local-4edge", "hetero", "mpi-4edge", "mpi-2edge", "secured", "multihost",
            "bench-2edge"} <= names
    multihost = load_topology(REPO / "topologies/multihost.yaml", check_bundle=False)
    assert all(n.host.startswith("192.0.2.") for n in [multihost.aggregator, *multihost.edges])
    assert load_topology(REPO / "topologies/secured.yaml", check_bundle=False).security.curve


# ------------------------------------------------------------------------------------- bundles


@pytest.fixture(scope="module")
def bundle2(tmp_path_factory):
    from .runtime_helpers import make_bundle  # random weights: only the manifest matters here

    return make_bundle(tmp_path_factory.mktemp("bundles") / "two", widths=(32, 48))


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_bundle_relative_to_yaml_folder_and_checked(tmp_path, bundle2):
    (tmp_path / "cfg").mkdir()
    data = topo(bundle=str(Path("..") / "b2"))
    (tmp_path / "b2").symlink_to(bundle2, target_is_directory=True)
    data["edges"][1]["embed_dim"] = 48
    t = load_topology(write(tmp_path / "cfg" / "t.yaml", data))
    assert t.bundle == (tmp_path / "b2").resolve()


def test_bundle_not_found(tmp_path):
    with pytest.raises(TopologyError, match=r"t.yaml: bundle: bundle 'b' not found: no manifest.json in "
                                            r".*/b or .*devit_mq/assets/bundles/b"):
        load_topology(write(tmp_path / "t.yaml", topo()))


def test_bundle_with_fewer_edges_than_submodels(tmp_path, bundle2):
    data = topo(bundle=str(bundle2))
    data["edges"].pop()
    with pytest.raises(TopologyError, match=r"edges: the bundle at .* has N=2 sub-models \(widths 32, 48\) but the "
                                            r"topology has 1 edge\(s\); no edge runs sub-model\(s\) 1"):
        load_topology(data)


def test_bundle_with_more_edges_than_submodels(tmp_path, bundle2):
    data = topo(bundle=str(bundle2))
    data["edges"].append({"name": "edge2", "submodel": 2, "port": 5612})
    with pytest.raises(TopologyError) as info:
        load_topology(data)
    text = str(info.value)
    assert "edges[2].submodel: sub-model 2 does not exist" in text and "has N=2 sub-models" in text


def test_feature_width_mismatch(bundle2):
    data = topo(bundle=str(bundle2))
    data["edges"][0]["embed_dim"] = 48
    with pytest.raises(TopologyError, match="edges\\[0\\].embed_dim: 48 does not match the bundle: sub-model 0 is "
                                            "32 wide"):
        load_topology(data)


def test_check_against_bundle_takes_a_manifest(bundle2):
    from devit_mq.model import load_manifest

    t = load_topology(topo(bundle=str(bundle2)))
    check_against_bundle(t, load_manifest(bundle2))
    t4 = load_topology(topo(bundle=str(bundle2), edges=BASE["edges"] + [
        {"name": "edge2", "submodel": 2, "port": 5612}, {"name": "edge3", "submodel": 3, "port": 5613}]),
        check_bundle=False)
    with pytest.raises(TopologyError, match="N=2"):
        check_against_bundle(t4, load_manifest(bundle2))


def test_broken_bundle_manifest(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text("{not json")
    with pytest.raises(TopologyError, match="bundle: bundle at .* is unusable: .*not valid JSON"):
        load_topology(topo(bundle=str(tmp_path / "b")))


# ----------------------------------------------------------------------------------- the command


def test_check_command_prints_summary(tmp_path, bundle2, capsys):
    path = write(tmp_path / "t.yaml", topo(bundle=str(bundle2)))
    assert check_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "topology 't'" in out and "codec int8" in out
    assert "N=2 sub-models, widths 32, 48" in out
    assert "edge1" in out and "sub-model 1 (48-d)" in out and "tcp://127.0.0.1:5611" in out
    assert out.rstrip().endswith("ok")


def test_check_command_fails_with_the_message(tmp_path, capsys):
    path = write(tmp_path / "t.yaml", topo(codec="int4"))
    assert check_main([str(path), "--no-bundle"]) == 2
    assert "codec: 'int4' is not one of" in capsys.readouterr().err
    assert check_main([str(write(tmp_path / "u.yaml", topo()))]) == 2  # bundle missing
    assert "bundle 'b' not found" in capsys.readouterr().err


def test_check_command_ranks_and_nodes(tmp_path, capsys):
    path = write(tmp_path / "t.yaml", topo())
    assert check_main([str(path), "--no-bundle", "--ranks"]) == 0
    assert capsys.readouterr().out.strip() == "3"
    assert check_main([str(path), "--no-bundle", "--nodes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split("\t") == ["edge0", "edge", "127.0.0.1", "tcp://127.0.0.1:5610"]


def test_check_command_wants_curve_keys(tmp_path, capsys):
    from devit_mq.transport.security import main_keys

    path = write(tmp_path / "t.yaml", topo(security={"curve": True, "keys_dir": "keys"}))
    assert check_main([str(path), "--no-bundle"]) == 2
    assert "security.keys_dir:" in capsys.readouterr().err
    assert main_keys([str(tmp_path / "keys"), "--nodes", "aggregator,edge0"]) == 0
    assert check_main([str(path), "--no-bundle"]) == 2
    assert "no key pair for edge1, client" in capsys.readouterr().err
    assert main_keys([str(tmp_path / "keys"), "--topology", str(path)]) == 2  # refuses to overwrite
    assert main_keys([str(tmp_path / "keys"), "--nodes", "../evil"]) == 2
    assert "not valid node names: '../evil'" in capsys.readouterr().err
    assert main_keys([str(tmp_path / "keys"), "--topology", str(path), "--force"]) == 0
    assert check_main([str(path), "--no-bundle"]) == 0
    secret = tmp_path / "keys" / "edge1.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys" / "admin.key_secret").is_file()  # the operator's pair comes with --topology
    # clients in bulk, each its own pair
    assert main_keys([str(tmp_path / "keys"), "--clients", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "keys").glob("client-*.key_secret")) == [
        "client-0000.key_secret", "client-0001.key_secret", "client-0002.key_secret"]
    assert main_keys([str(tmp_path / "keys")]) == 2  # nothing asked for


@pytest.mark.timeout(60)
def test_multihost_script_prints_one_node_command_per_host():
    import subprocess
    import sys

    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    out = subprocess.run(["bash", str(REPO / "launch" / "zmq-multihost.sh"), "topologies/multihost.yaml"],
                         capture_output=True, text=True, timeout=50, cwd=REPO, env={"PATH": env_path})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "# on 192.0.2.10 (aggregator, listens at tcp://192.0.2.10:5600)" in lines
    commands = [line for line in lines if not line.startswith("#")]
    assert commands == [  # nothing of this checkout's layout: the hosts' own command and paths
        f"devit-mq node /etc/devit-mq/topology.yaml --name {n}" for n in ("aggregator", "edge0", "edge1")]
    env = {"PATH": env_path, "REMOTE_DEVIT": "/opt/devit-mq/bin/devit-mq", "REMOTE_TOPOLOGY": "/srv/t.yaml",
           "REMOTE_BUNDLE": "/srv/bundle", "REMOTE_KEYS_DIR": "/srv/keys"}
    out = subprocess.run(["bash", str(REPO / "launch" / "zmq-multihost.sh"), "topologies/multihost.yaml"],
                         capture_output=True, text=True, timeout=50, cwd=REPO, env=env)
    assert [line for line in out.stdout.splitlines() if not line.startswith("#")][1] == (
        "/opt/devit-mq/bin/devit-mq node /srv/t.yaml --name edge0 --bundle /srv/bundle --keys-dir /srv/keys")


@pytest.mark.parametrize("cpus, message", [
    ([], "expected a non-empty list of CPU numbers"), ("0", "expected a non-empty list of CPU numbers"),
    ([0, -1], "expected a non-empty list of CPU numbers"), ([True], "expected a non-empty list of CPU numbers"),
    ([1, 1], "lists a CPU twice"),
])
def test_cpus_must_be_a_list_of_distinct_cpu_numbers(cpus, message):
    data = topo()
    data["edges"][0]["cpus"] = cpus
    with pytest.raises(TopologyError, match=r"edges\[0\]\.cpus: " + message):
        load_topology(data, check_bundle=False)


def test_cpus_pin_the_node_process_and_a_missing_cpu_is_named(tmp_path):
    import subprocess
    import sys

    data = topo()
    data["edges"][0]["cpus"] = [0]
    data["edges"][1]["cpus"] = [4096]
    path = write(tmp_path / "t.yaml", data)
    script = ("import os, sys; from devit_mq.topology import load_topology; from devit_mq.nodes.runtime import pin_cpus\n"
              "t = load_topology(sys.argv[1], check_bundle=False)\n"
              "pin_cpus(t, t.node('edge0')); print(sorted(os.sched_getaffinity(0)))\n"
              "try:\n    pin_cpus(t, t.node('edge1'))\nexcept Exception as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "[0]"
    assert "edges[1].cpus: CPU(s) [4096] are not available" in lines[1]
    assert load_topology(path, check_bundle=False).to_dict()["edges"][0]["cpus"] == [0]
