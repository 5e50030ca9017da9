"""The settlement writer checks every pain file against the XSD shipped in ``cloud/schemas/``
(and the SEPA rules) before it writes anything: a document that fails is refused with an
error naming the file and the first error, and the output directory stays as it was."""

import importlib.resources
from pathlib import Path

import pytest

from cloud.iso20022 import pain001, pain008
from cloud.settle_files import SCHEMA_FILES, SettlementFileError, check_file, write_files
from tests.cloud.test_iso20022 import CREATED, CREDITOR, DEBTOR, make_plan

CSV = b"period_id,line_id\r\nP1,P1-C000001\r\n"


@pytest.fixture(scope="module")
def docs() -> dict[str, bytes]:
    p8 = pain008(make_plan(), creditor=CREDITOR, created_at=CREATED)
    p1 = pain001(make_plan(), debtor=DEBTOR, created_at=CREATED)
    assert p8 is not None and p1 is not None
    return {"P1-pain.008.xml": p8, "P1-pain.001.xml": p1}


def test_the_schemas_ship_as_package_data() -> None:
    folder = importlib.resources.files("cloud") / "schemas"
    for name in (*SCHEMA_FILES.values(), "LICENSE.python-sepaxml", "SOURCES.md"):
        assert (folder / name).is_file(), name
    assert b"pain.008.001.02" in (folder / SCHEMA_FILES[next(iter(SCHEMA_FILES))]).read_bytes()


def test_generated_files_pass_and_are_written(docs: dict[str, bytes], tmp_path: Path) -> None:
    write_files(tmp_path, {"P1.csv": CSV, **docs})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "P1-pain.001.xml",
        "P1-pain.008.xml",
        "P1.csv",
    ]
    assert (tmp_path / "P1-pain.008.xml").read_bytes() == docs["P1-pain.008.xml"]


@pytest.mark.parametrize(
    ("name", "old", "new", "where"),
    [
        # lower-case country code: the XSD's IBAN2007Identifier pattern refuses it
        ("P1-pain.008.xml", b"<IBAN>DE89", b"<IBAN>de89", "CdtrAcct/Id/IBAN"),
        # a BIC of 7 characters: the XSD's BICIdentifier pattern refuses it
        ("P1-pain.001.xml", b"<BIC>BKAUATWW</BIC>", b"<BIC>BKAUATW</BIC>", "BIC"),
        # an element the schema does not know
        ("P1-pain.008.xml", b"<ChrgBr>SLEV</ChrgBr>", b"<Fee>SLEV</Fee>", "PmtInf"),
    ],
)
def test_a_document_failing_its_xsd_is_refused_and_nothing_written(
    docs: dict[str, bytes], tmp_path: Path, name: str, old: bytes, new: bytes, where: str
) -> None:
    assert old in docs[name]
    bad = docs[name].replace(old, new, 1)
    out = tmp_path / "settlement"
    with pytest.raises(SettlementFileError) as info:
        write_files(out, {"P1.csv": CSV, **docs, name: bad})
    message = str(info.value)
    assert message.startswith(f"{name}: fails {SCHEMA_FILES[_ns(bad)]} at ")
    assert where in message and "{urn:" not in message
    assert not out.exists()  # not the CSV, not the other pain file, no temporary file


def test_a_document_the_xsd_takes_but_sepa_refuses_is_refused(
    docs: dict[str, bytes], tmp_path: Path
) -> None:
    """The XSD takes an IBAN with a wrong checksum; the SEPA rules do not."""
    name = "P1-pain.008.xml"
    bad = docs[name].replace(b"<IBAN>DE89", b"<IBAN>DE88", 1)
    check_file("ok.csv", b"anything")  # only pain files are checked
    with pytest.raises(SettlementFileError, match=r"P1-pain.008.xml: fails the SEPA rules: .*IBAN"):
        write_files(tmp_path / "s", {name: bad})
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"<Document", "not XML"),
        (b'<Document xmlns="urn:example:other"/>', "no shipped schema"),
        (b"<Document/>", "no shipped schema"),
    ],
)
def test_not_a_pain_document_is_refused(tmp_path: Path, data: bytes, match: str) -> None:
    with pytest.raises(SettlementFileError, match=match):
        write_files(tmp_path / "s", {"P1-pain.008.xml": data})
    assert not (tmp_path / "s").exists()


def _ns(xml: bytes) -> str:
    return next(ns for ns in SCHEMA_FILES if ns.encode() in xml)
