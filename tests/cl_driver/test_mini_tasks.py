import numpy as np
import pytest

from cl_driver.mini.tasks import BUILTIN_TASKS, get_task


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_at_least_eight_tasks_in_a_fixed_order():
    assert len(BUILTIN_TASKS) >= 8
    assert len(set(BUILTIN_TASKS)) == len(BUILTIN_TASKS)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_spec_is_well_formed(name):
    spec = get_task(name)
    assert spec.name == name
    assert len(spec.class_names) >= 4 and len(set(spec.class_names)) == len(spec.class_names)
    assert spec.templates and all("{}" in t for t in spec.templates)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_render_is_deterministic_balanced_and_rgb(name):
    spec = get_task(name)
    images, labels = spec.render("test", 24, image_size=32, seed=3)
    again, labels_again = spec.render("test", 24, image_size=32, seed=3)
    assert labels == labels_again
    assert np.array_equal(pixels(images), pixels(again))
    assert all(im.mode == "RGB" and im.size == (32, 32) for im in images)
    assert all(isinstance(y, int) and 0 <= y < len(spec.class_names) for y in labels)
    counts = np.bincount(labels, minlength=len(spec.class_names))
    assert counts.max() - counts.min() <= 1 or counts.min() >= 24 // len(spec.class_names) - 1


def test_splits_and_seeds_differ_and_prefixes_agree():
    spec = get_task("digits")
    train, _ = spec.render("train", 10)
    test, _ = spec.render("test", 10)
    held_out, _ = spec.render("val", 10)
    other, _ = spec.render("train", 10, seed=1)
    assert not np.array_equal(pixels(train), pixels(test))
    assert not np.array_equal(pixels(held_out), pixels(train)) and not np.array_equal(pixels(held_out), pixels(test))
    assert not np.array_equal(pixels(train), pixels(other))
    longer, longer_labels = spec.render("train", 20)
    assert np.array_equal(pixels(longer[:10]), pixels(train))


def test_image_size_is_respected():
    images, _ = get_task("letters").render("train", 3, image_size=48)
    assert all(im.size == (48, 48) for im in images)


def test_tasks_have_distinct_styles():
    # The mean image (background and palette) of every task differs from every other.
    means = {n: pixels(get_task(n).render("train", 16)[0]).reshape(-1, 3).mean(0) for n in BUILTIN_TASKS}
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(means[a] - means[b]).max() > 5, (a, b)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown built-in task"):
        get_task("nope")
    with pytest.raises(ValueError, match="split"):
        get_task("shapes").render("validation", 2)
