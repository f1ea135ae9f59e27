"""Reads for cost per token type: each deployment's cost split into input and output by the operator's rule
(economics.split), summed per model, beside the price the tenant's price book charges for each, so a price
book can be checked against what an input and an output token cost to make."""

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from portal.billing.models import ModelPrice
from portal.billing.selectors import PriceIndex, price_books_for
from portal.capacity.models import Deployment
from portal.economics.selectors import DeploymentCost
from portal.economics.split import TokenTypeCost


@dataclass
class DeploymentTokenTypes:
    deployment: Deployment
    currency: str
    split: TokenTypeCost
    price: ModelPrice | None  # in force for the deployment's tenant and model at the period's end

    @property
    def input_margin(self) -> float | None:
        return _margin(self.price.input_per_mtok if self.price else None, self.split.input_per_million)

    @property
    def output_margin(self) -> float | None:
        return _margin(self.price.output_per_mtok if self.price else None, self.split.output_per_million)


def _margin(price: Decimal | None, cost: Decimal | None) -> float | None:
    """(price - cost) ÷ price: the share of each token's price left after its cost."""
    if price is None or cost is None or not price:
        return None
    return float((price - cost) / price)


@dataclass
class ModelTokenTypes:
    model_name: str
    currency: str
    split: TokenTypeCost


@dataclass
class TokenTypes:
    models: list[ModelTokenTypes]
    deployments: list[DeploymentTokenTypes]


def token_type_costs(*, costs: list[DeploymentCost], rule: str, output_weight: Decimal,
                     end: datetime) -> TokenTypes:
    """Every deployment's split (economics.split.cost_split, one deployment at a time) and their sums per model
    and currency; deployments that served no token are left out."""
    served = [c for c in costs if c.cost.tokens]
    deployments = Deployment.objects.select_related("tenant", "node__site").in_bulk([c.deployment_id for c in served])
    books = price_books_for(tenants=list({d.tenant for d in deployments.values()}))
    indexes = {book.pk: PriceIndex(book) for book in books.values() if book is not None}
    by_model: dict[tuple[str, str], TokenTypeCost] = {}
    lines = []
    for c in served:
        split = c.split(rule=rule, output_weight=output_weight)
        by_model.setdefault((c.model_name, c.cost.currency), TokenTypeCost()).add(split)
        deployment = deployments[c.deployment_id]
        book = books[deployment.tenant_id]
        price = indexes[book.pk].at(c.model_name, end.astimezone(UTC).date()) if book else None
        lines.append(DeploymentTokenTypes(deployment=deployment, currency=c.cost.currency, split=split, price=price))
    lines.sort(key=lambda line: (line.deployment.model_name, line.deployment.tenant.name, line.deployment.pk))
    models = [ModelTokenTypes(model_name=name, currency=currency, split=split)
              for (name, currency), split in sorted(by_model.items())]
    return TokenTypes(models=models, deployments=lines)
