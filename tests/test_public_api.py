import jaxnan


def test_all_sorted_and_unique():
    names = list(jaxnan.__all__)
    assert names == sorted(names)
    assert len(names) == len(set(names))


def test_all_names_exist_and_are_documented():
    for name in jaxnan.__all__:
        if name == "ArrayTree":  # a typing alias (chex.ArrayTree)
            continue
        obj = getattr(jaxnan, name)
        assert obj.__doc__, name


def test_no_private_leaks():
    import types

    public = {
        n
        for n in dir(jaxnan)
        if not n.startswith("_")
        and not isinstance(getattr(jaxnan, n), types.ModuleType)
    }
    assert public - set(jaxnan.__all__) == set()
