"""KFP component ``fan_out``: the items a fanned-out stage iterates over (``dsl.ParallelFor``)."""

from kfp import dsl

from components.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def fan_out(config: dict, section: str, field: str) -> list:
    """The shard indices ``[0, ..., n - 1]`` when the field is a shard count, else its items (a
    field inside a section parameter cannot be looped over directly).

    Args:
        config: the config section (e.g. the bld section), validated here.
        section: the section's name (``bld``, ``scoring``, ``baselines``).
        field: the field holding a count (``shards``) or a list (``methods``).

    Returns:
        The items to fan out over.
    """
    from puzzle.config import parse_section

    value = getattr(parse_section(section, config), field)
    return list(value) if isinstance(value, list) else list(range(int(value)))
