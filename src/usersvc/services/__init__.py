"""Use cases: business rules over a unit of work; they raise domain errors."""
