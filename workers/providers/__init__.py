"""Provider adapters, one module per upstream protocol, all behind ``base.Provider``.

``ADAPTERS`` keys are the provider names: the catalogue's ``provider`` and the account names
of ``TOLLGATE_UPSTREAMS``.
"""

from collections.abc import Callable

import httpx

from workers.providers.base import Endpoint, Provider
from workers.providers.bfl import BflProvider
from workers.providers.krea import KreaProvider
from workers.providers.openai import OpenAIProvider
from workers.providers.siliconflow import SiliconFlowProvider
from workers.providers.unified import UnifiedProvider

ADAPTERS: dict[str, Callable[[httpx.AsyncClient, Endpoint], Provider]] = {
    "krea": KreaProvider,
    "siliconflow": SiliconFlowProvider,
    "unified": UnifiedProvider,
    "openai": OpenAIProvider,
    "bfl": BflProvider,
}
