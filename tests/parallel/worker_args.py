"""Command lines of the parallel test workers that build several models in one launch
(a launch is ~10 s of start-up on two shared cores)."""


def config_and_groups(argv: list[str]) -> tuple[str, list[list[str]]]:
    """CONFIG [overrides] [--then overrides] ... -> (CONFIG, one override list per group);
    the launcher's --local_rank argument is dropped."""
    args = [a for a in argv if not a.startswith("--local_rank")]
    groups = [[]]
    for a in args[1:]:
        if a == "--then":
            groups.append([])
        else:
            groups[-1].append(a)
    return args[0], groups
