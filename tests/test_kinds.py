"""The table of connection kinds (hcvision.connections.kinds): one record per kind, everything else derived from it."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import hcvision  # noqa: F401  (registers the models)
from hcvision.compare.spec import kind_help, kind_label_re, model_kind_re
from hcvision.connections import (
    KINDS,
    Connection,
    KindRecord,
    build_connection,
    connection_options,
    expand_streams,
    kind_record,
    kind_records,
    kinds,
    reduce_streams,
)
from hcvision.models._common import variant_title
from hcvision.models.dit import DIT_SIZES
from hcvision.models.vit import VIT_SIZES

REPO = Path(__file__).resolve().parents[1]


def test_the_table_holds_every_kind_in_order():
    assert KINDS == ("residual", "shc", "dhc", "sfc", "dfc", "mhc", "mhclite", "kromhc")
    assert [r.name for r in kind_records()] == list(KINDS)
    layouts = {r.name: r.layout for r in kind_records()}
    assert layouts == {"residual": "single", "shc": "copies", "dhc": "copies", "sfc": "fractions",
                       "dfc": "fractions", "mhc": "copies", "mhclite": "copies", "kromhc": "copies"}
    assert {r.name for r in kind_records() if r.dynamic} == {"dhc", "dfc", "mhc", "mhclite", "kromhc"}
    assert {r.name: r.family for r in kind_records()} == {
        "residual": None, "shc": "static", "dhc": "dynamic", "sfc": "static", "dfc": "dynamic", "mhc": "mhc",
        "mhclite": None, "kromhc": None}


@pytest.mark.parametrize("kind", KINDS)
def test_each_record_builds_its_kind_with_its_options(kind):
    record = kind_record(kind)
    rate = record.zoo_rates[-1]
    conn = build_connection(kind.upper(), 8, rate, 0)
    assert isinstance(conn, Connection) and conn.kind == kind and conn.record is record
    assert conn.dynamic == record.dynamic and connection_options(kind) == record.options
    x = torch.randn(2, 3, 8)
    H = expand_streams(x, kind, rate)
    assert H.shape == (2, 3, *record.stream_shape(rate, 8)) and conn.num_inputs == record.num_inputs(rate)
    assert reduce_streams(H, kind).shape == x.shape
    assert sum(p.numel() for p in conn.parameters()) == record.extra_parameters(8, rate, None)


@pytest.mark.parametrize("family,sizes", [("vit", VIT_SIZES), ("dit", DIT_SIZES)])
def test_every_kind_is_registered_for_every_size_at_its_zoo_rates(family, sizes):
    names = set(timm.list_models(f"{family}_*"))
    for record in kind_records():
        for n in record.zoo_rates:
            missing = [size for size in sizes if f"{size}_{record.suffix(n)}" not in names]
            assert not missing, (record.name, n, missing)
    assert "vit_small_patch16_224_mhclite4" in names or family == "dit"
    assert "dit_xl_2_kromhc2" in names or family == "vit"


def test_titles_and_compare_labels_come_from_the_records():
    assert variant_title("residual", 1) == "Pre-Norm residual baseline"
    assert variant_title("dfc", 2) == "dynamic Frac-Connections (m=2)"
    assert variant_title("kromhc", 4) == "KromHC, Kronecker-product Hyper-Connections (n=4)"
    assert "KromHC" in timm.models.model_entrypoint("vit_digits_patch2_8_kromhc2").__doc__
    label = kind_label_re()
    assert all(label.match(r.suffix(n)) for r in kind_records() for n in r.zoo_rates)
    assert not label.match("mhcl2") and not label.match("res2") and not label.match("kromhc0")
    assert model_kind_re().search("vit_digits_patch2_8_mhclite4").group(1) == "mhclite4"
    assert all(r.tag in kind_help() for r in kind_records())


def test_bad_records_are_refused():
    with pytest.raises(ValueError, match="unknown layout 'streams'; accepted: single, copies, fractions"):
        KindRecord(name="toy", title="t", layout="streams", dynamic=False, build=object)
    with pytest.raises(ValueError, match="unknown fast-path family 'fast'"):
        KindRecord(name="toy", title="t", layout="copies", dynamic=False, build=object, family="fast")
    with pytest.raises(ValueError, match="already registered"):
        kinds.register(kind_record("dhc"))
    with pytest.raises(ValueError, match="tag 'res' is already used by kind 'residual'"):
        kinds.register(KindRecord(name="toy", title="t", layout="single", dynamic=False, build=object, tag="res"))
    with pytest.raises(ValueError, match="unknown connection kind 'dch' \\(did you mean 'dhc'\\?\\)"):
        kind_record("dch")


# A new kind, declared in one place: its class and its record. Run in a fresh interpreter so the test's timm names do
# not leak into the rest of the suite (timm has no way to unregister).
TOY_KIND = textwrap.dedent('''
    import sys
    import timm
    import torch
    from torch import nn

    from hcvision.connections import Connection, KindRecord, WidthContext, build_connection, kinds


    class GatedResidual(Connection):
        """x + g T(x) with a learned scalar gate g (1 at init)."""

        def __init__(self, dim, rate=1, layer_index=0, *, gate_init=1.0, **common):
            super().__init__("gated", dim, rate, layer_index, **common)
            self.gate = nn.Parameter(torch.full((1,), float(gate_init)))

        def coefficients(self, H=None):
            return torch.ones(1, 2, dtype=self.gate.dtype), self.gate


    kinds.register(KindRecord(name="gated", title="gated residual", layout="single", dynamic=False,
                              build=GatedResidual, options=("gate_init", "recompute", "recompute_every"),
                              extra_parameters=lambda dim, rate, norm_params=None: 1))

    from hcvision.compare import build_spec
    from hcvision.compare.spec import kind_help

    conn = build_connection("gated", 8, gate_init=0.5)
    x = torch.randn(2, 8)
    H = x.unsqueeze(-2)
    torch.testing.assert_close(conn(H, torch.tanh).squeeze(-2), x + 0.5 * torch.tanh(x))
    assert "vit_digits_patch2_8_gated" in timm.list_models("*_gated")
    assert "dit_digits_2_gated" in timm.list_models("*_gated")
    model = timm.create_model("vit_digits_patch2_8_gated")
    assert model.blocks[0].attn_conn.kind == "gated"
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert "gated" in kind_help()
    spec = build_spec(sys.argv[1], out=sys.argv[2], kinds="res,gated", seeds="0",
                      overrides=["epochs=1", "max_steps=2"])
    assert [c.kind for c in spec.cells] == ["res", "gated"]
    assert "model=vit_digits_patch2_8_gated" in spec.cells[1].argv
    print("toy kind ok")
''')


def test_a_kind_registered_in_one_place_reaches_timm_compare_and_build_connection(tmp_path):
    script = tmp_path / "toy_kind.py"
    script.write_text(TOY_KIND)
    # Importing hcvision.connections registers the model families first: the toy kind reaches timm through the
    # registry's listener, the path any kind defined outside the package takes.
    config = str(REPO / "configs" / "cls" / "digits_res.yaml")
    proc = subprocess.run([sys.executable, str(script), config, str(tmp_path / "cmp")], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "toy kind ok" in proc.stdout
