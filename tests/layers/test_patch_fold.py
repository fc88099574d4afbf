import numpy as np
import pytest

from medt_keras.layers import PatchFold, PatchUnfold


def test_fold_order_is_the_official_loop_order():
    # The official loop visits patch (i, j) row-major, i first, and slices
    # x[:, :, 32*i:32*(i+1), 32*j:32*(j+1)]; batch group i*4+j (every 16th
    # item from i*4+j on, BatchNorm's interleaved groups) must be that patch,
    # and each image's 16 patches are contiguous.
    x = np.random.default_rng(0).normal(size=(3, 16, 16, 2)).astype("float32")
    folded = np.asarray(PatchFold(4)(x))
    assert folded.shape == (48, 4, 4, 2)
    for i in range(4):
        for j in range(4):
            group = folded[i * 4 + j :: 16]
            np.testing.assert_array_equal(group, x[:, 4 * i : 4 * (i + 1), 4 * j : 4 * (j + 1)])
    for n in range(3):
        np.testing.assert_array_equal(folded[16 * n : 16 * (n + 1)], np.asarray(PatchFold(4)(x[n : n + 1])))


def test_unfold_inverts_fold():
    x = np.random.default_rng(1).normal(size=(2, 12, 18, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(PatchUnfold(3)(PatchFold(3)(x))), x)


def test_indivisible_size_is_a_clear_error():
    with pytest.raises(ValueError, match="width 18 is not divisible by the patch grid 4"):
        PatchFold(4).build((None, 16, 18, 3))
