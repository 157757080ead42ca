"""Provider adapters, one module per upstream protocol, all behind ``base.Provider``."""

from collections.abc import Callable

import httpx

from workers.providers.base import Endpoint, Provider
from workers.providers.krea import KreaProvider
from workers.providers.siliconflow import SiliconFlowProvider

ADAPTERS: dict[str, Callable[[httpx.AsyncClient, Endpoint], Provider]] = {
    "krea": KreaProvider,
    "siliconflow": SiliconFlowProvider,
}
