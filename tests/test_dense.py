import keras
import numpy as np
import pytest

from keras_gemma.layers.dense import EinsumDense
from keras_gemma.layers.dense import _is_matmul


@pytest.mark.parametrize(
    "equation, expected",
    [("btd,df->btf", True), ("btf,fd->btd", True), ("btd,ndh->btnh", False),
     ("btnh,nhd->btd", False), ("btd,fd->btf", False)],
)
def test_only_plain_matrix_products_take_the_matmul_path(equation, expected):
    assert _is_matmul(equation) is expected


@pytest.mark.parametrize("lora", [False, True])
def test_matmul_path_equals_keras_einsum_dense(lora):
    """Same outputs as Keras' layer on the same weights, with LoRA too."""
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    ours = EinsumDense("btd,df->btf", (None, 5))
    reference = keras.layers.EinsumDense("btd,df->btf", (None, 5))
    for layer in (ours, reference):
        layer.build(x.shape)
        if lora:
            layer.enable_lora(2)
    for mine, theirs in zip(ours.weights, reference.weights):
        mine.assign(np.random.default_rng(1).normal(size=mine.shape).astype("float32"))
        theirs.assign(mine.value)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ours(x)), keras.ops.convert_to_numpy(reference(x)),
        atol=1e-5, rtol=0,
    )
