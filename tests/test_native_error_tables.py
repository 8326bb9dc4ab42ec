"""The error tables in vmem/errors.py match vmem/_native/vmem.h, so neither can drift (issue 8, item 8)."""
import pathlib
import re

from vmem import errors
from vmem._native import lib

STATUSES = ("OK", "OOM", "MAP_LIMIT", "INVALID", "DRIVER", "UNSUPPORTED", "CLOSED", "BUSY")   # errors.py's names
HEADER = pathlib.Path(errors.__file__).resolve().parent / "_native" / "vmem.h"


def _defines(prefix: str) -> dict:
    text = HEADER.read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define\s+(%s\w*)\s+(\d+)" % prefix, text, re.M)}


def test_status_codes_match_the_header():
    codes = _defines("VMEM_(?:OK|ERR_)")
    assert codes, "no status codes parsed from vmem.h"
    python = {("VMEM_OK" if name == "OK" else "VMEM_ERR_" + name): getattr(errors, name) for name in STATUSES}
    assert python == codes
    for name, code in codes.items():                        # and the built extension
        assert getattr(lib, name) == code


def test_every_detail_code_has_words_and_no_more():
    details = _defines("VMEM_DETAIL_")
    assert sorted(details.values()) == sorted(errors.DETAILS), (details, sorted(errors.DETAILS))
    for name, code in details.items():
        assert getattr(lib, name) == code
        assert code == 0 or errors.DETAILS[code], name


def test_every_status_raises_its_own_class():
    raised = {}
    errors.check(errors.OK, "op")
    for name in STATUSES[1:]:
        try:
            errors.check(getattr(errors, name), "op")
        except errors.VmemError as exc:
            raised[name] = type(exc)
    assert len(set(raised.values())) == len(raised) == len(STATUSES) - 1


def test_limits_match_the_header():
    assert _defines("VMEM_MAX_POOLS")["VMEM_MAX_POOLS"] == errors.MAX_POOLS == lib.VMEM_MAX_POOLS
