"""A step's inputs packed into one buffer: every array comes back whole, in its dtype and shape,
each 16-byte aligned, and a step's views survive the next step's staging."""

import numpy as np
import torch

from worker.step_staging import StepStaging


def test_arrays_come_back_as_views_of_one_buffer():
    staging = StepStaging(torch.device("cpu"))
    ids, slots = np.arange(3, dtype=np.int64), np.array([2**40, -1, 7])  # both padded
    tables = np.arange(6, dtype=np.int32).reshape(2, 3)
    lens = np.array([3, 9], dtype=np.int64)  # narrowed to int32 on the way
    (ids_d, slots_d), (tables_d, lens_d) = staging.to_device([ids, slots], [tables, lens])
    assert ids_d.tolist() == ids.tolist() and slots_d.tolist() == slots.tolist()
    assert tables_d.dtype == lens_d.dtype == torch.int32
    assert tables_d.tolist() == tables.tolist() and lens_d.tolist() == [3, 9]
    assert ids_d.untyped_storage().data_ptr() == tables_d.untyped_storage().data_ptr()
    assert all(t.data_ptr() % 16 == 0 for t in (ids_d, slots_d, tables_d, lens_d))


def test_a_step_s_views_hold_until_two_steps_later_and_buffers_grow():
    staging = StepStaging(torch.device("cpu"))
    (first,), _ = staging.to_device([np.full(4, 1)], [])
    (second,), _ = staging.to_device([np.full(1000, 2)], [])  # the other buffer, grown
    assert first.tolist() == [1] * 4 and second.tolist() == [2] * 1000
    (third,), _ = staging.to_device([np.full(4, 3)], [])  # first's buffer again
    assert third.tolist() == [3] * 4 and second.tolist() == [2] * 1000
