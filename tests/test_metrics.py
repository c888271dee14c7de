import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from unet_seg.metrics import all_reduce_confusion, confusion_matrix, fb_iou, iou_per_class, iou_table, mean_iou

seeds = st.integers(0, 2**31 - 1)

# A hand-made case with 4 classes; class 3 appears in neither target nor prediction.
#   pixel:   a  b  c  d  e  f
#   target:  0  0  1  1  2  255
#   pred:    0  1  1  1  0  2     (f is ignored although the prediction is wrong)
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]]])
CONF = [  # rows: target, columns: prediction
    [1, 1, 0, 0],
    [0, 2, 0, 0],
    [1, 0, 0, 0],
    [0, 0, 0, 0],
]


def test_confusion_matrix_of_hand_made_case_drops_ignored_pixels():
    conf = confusion_matrix(PRED, TARGET, 4)
    assert conf.tolist() == CONF and conf.dtype == torch.long


def test_iou_of_hand_made_case_follows_mmseg():
    conf = torch.tensor(CONF)
    # class 0: TP 1, FP 1 (e), FN 1 (b) -> 1/3; class 1: TP 2, FP 1 (b) -> 2/3; class 2: FN 1 -> 0;
    # class 3: absent from both -> NaN, left out of the mean: (1/3 + 2/3 + 0) / 3, not / 4.
    iou = iou_per_class(conf)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(iou[3])
    assert mean_iou(conf).item() == pytest.approx(1 / 3)
    assert iou.dtype == torch.float64


def test_fb_iou_of_hand_made_binary_case():
    target = torch.tensor([[1, 1, 0, 0]])
    pred = torch.tensor([[1, 0, 0, 0]])
    conf = confusion_matrix(pred, target, 2)
    assert conf.tolist() == [[2, 0], [1, 1]]
    # background: TP 2, FP 1 -> 2/3; foreground: TP 1, FN 1 -> 1/2
    assert fb_iou(conf).item() == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_iou_table_is_aligned_plain_text_with_a_title_and_a_labelled_mean():
    """The mean row says what it averages (a bare "mean" sat above a differently averaged mIoU)."""
    table = iou_table(torch.tensor(CONF), ["road", "car", "sky", "bus"], title="IoU per class")
    expected = "\n".join(
        [
            "IoU per class",
            "Class                  IoU      Acc",
            "-----------------------------------",
            "road                 33.33    50.00",
            "car                  66.67   100.00",
            "sky                   0.00     0.00",
            "bus                    nan      nan",
            "mean of 3 classes    33.33    50.00",
        ]
    )
    assert table == expected


def test_iou_table_names_classes_by_index_by_default():
    assert iou_table(torch.tensor([[1, 0], [0, 1]])).splitlines()[2].split() == ["0", "100.00", "100.00"]
    assert iou_table(torch.tensor([[1, 0], [0, 1]])).splitlines()[0].startswith("Class")


@given(seeds, st.integers(2, 6), st.integers(1, 5))
def test_confusion_matrix_is_invariant_to_batch_splitting(seed, num_classes, split):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(num_classes + 1, (6, 5, 4), generator=g)
    target[target == num_classes] = 255
    pred = torch.randint(num_classes, (6, 5, 4), generator=g)
    whole = confusion_matrix(pred, target, num_classes)
    parts = confusion_matrix(pred[:split], target[:split], num_classes) + confusion_matrix(
        pred[split:], target[split:], num_classes
    )
    assert torch.equal(whole, parts)
    assert whole.sum() == (target != 255).sum()
    assert torch.equal(whole.sum(1), torch.bincount(target[target != 255], minlength=num_classes))


@given(seeds, st.integers(2, 6))
def test_perfect_prediction_has_iou_one_for_present_classes_and_nan_for_absent(seed, num_classes):
    target = torch.randint(num_classes, (2, 4, 4), generator=torch.Generator().manual_seed(seed))
    iou = iou_per_class(confusion_matrix(target, target, num_classes))
    present = torch.bincount(target.flatten(), minlength=num_classes) > 0
    assert torch.equal(iou[present], torch.ones(int(present.sum()), dtype=torch.float64))
    assert iou[~present].isnan().all()
    assert mean_iou(confusion_matrix(target, target, num_classes)).item() == 1.0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_confusion_matrix_accepts_integer_dtypes_and_stays_on_device(dtype):
    conf = confusion_matrix(PRED.to(dtype), TARGET.to(dtype), 4)
    assert conf.tolist() == CONF and conf.dtype == torch.long and conf.device == PRED.device


def test_all_reduce_without_distributed_returns_the_matrix():
    conf = torch.tensor(CONF)
    assert all_reduce_confusion(conf) is conf


def _reduce_worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # rank 0 sees the first half of the hand-made case, rank 1 the second.
        conf = confusion_matrix(PRED[..., rank], TARGET[..., rank], 4)
        local = conf.clone()
        total = all_reduce_confusion(conf)
        expected = confusion_matrix(PRED[..., :2], TARGET[..., :2], 4)
        assert torch.equal(total, expected), (rank, total.tolist(), expected.tolist())
        assert torch.equal(conf, local), "the input must not be reduced in place"
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_confusion_matrices_over_two_gloo_processes(tmp_path):
    mp.spawn(_reduce_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="pred must hold integer labels"):
        confusion_matrix(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"found targets \[5\] and predictions \[\]"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([5, 1]), 2)
    with pytest.raises(ValueError, match=r"found targets \[\] and predictions \[2\]"):
        confusion_matrix(torch.tensor([2, 1]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="binary confusion matrix"):
        fb_iou(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="square"):
        iou_per_class(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        iou_table(torch.tensor(CONF), ["a", "b", "c"])


def test_few_shot_scores_by_hand():
    from unet_seg.metrics import few_shot_scores

    # labels: 0 background, 1 (a training class: in FB-IoU, not in the mIoU), 2 and 3 test classes
    conf = torch.tensor([[50, 0, 5, 5], [0, 4, 0, 0], [10, 0, 30, 0], [0, 0, 0, 20]])
    scores = few_shot_scores(conf, [2, 3])
    iou2, iou3 = 30 / (30 + 10 + 5), 20 / (20 + 0 + 5)
    fg, bg = 54 / (54 + 10 + 10), 50 / (50 + 10 + 10)  # pooled 2x2: [[50, 10], [10, 54]]
    assert scores == {"mIoU": round(100 * (iou2 + iou3) / 2, 2), "FB-IoU": round(100 * (fg + bg) / 2, 2)}
    with pytest.raises(ValueError, match="0 is background"):
        few_shot_scores(conf, [0, 2])
