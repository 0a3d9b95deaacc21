import pytest

from mixtune.core import Registry, UnknownNameError


def test_register_get_and_names_keep_order():
    reg: Registry[int] = Registry("thing")
    reg.add("beta", 2)
    reg.add("alpha", 1)
    assert reg.get("alpha") == 1
    assert reg.names() == ["beta", "alpha"]
    assert "beta" in reg and len(reg) == 2


def test_duplicate_name_is_refused():
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 2)
    assert reg.get("a") == 1


def test_unknown_name_suggests_close_matches_and_lists_all():
    reg: Registry[int] = Registry("merge method")
    for n in ("ties", "dare_ties", "task_arithmetic"):
        reg.add(n, 0)
    with pytest.raises(UnknownNameError) as e:
        reg.get("tiez")
    msg = str(e.value)
    assert "unknown merge method 'tiez'" in msg
    assert "Did you mean: ties" in msg
    assert "Available: dare_ties, task_arithmetic, ties" in msg


def test_names_must_be_snake_case():
    with pytest.raises(ValueError, match="snake_case"):
        Registry("thing").add("Bad-Name", 1)


def test_citation_required_when_asked():
    reg: Registry = Registry("merge method", require_citation=True)

    @reg.register("ties")
    def ties():
        """TIES-Merging (Yadav et al., 2023, arXiv:2306.01708), Alg. 1."""

    assert reg.get("ties") is ties
    with pytest.raises(ValueError, match="citation"):

        @reg.register("nocite")
        def nocite():
            """Merges things nicely."""
