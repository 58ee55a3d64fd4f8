"""Tests of the model helpers both stages share: device and dtype names."""

from __future__ import annotations

import pytest
import torch

from logitcache.errors import TeacherError
from logitcache.pipeline.common.hf_models import resolve_device, resolve_dtype


def test_dtypes():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(TeacherError, match="teacher.dtype"):
        resolve_dtype("int8", cpu)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TeacherError, match="not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(TeacherError, match="teacher.device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
