//! ISO 4217 currencies the ledger accepts, with their minor-unit exponent.
//! Amounts are always integers in minor units (fen, cents, yen).

/// (code, minor-unit digits). A currency not listed here is refused: an
/// unknown code is far more often a typo than a new currency.
const CURRENCIES: &[(&str, u8)] = &[
    ("AED", 2),
    ("AUD", 2),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("IDR", 2),
    ("INR", 2),
    ("JPY", 0),
    ("KRW", 0),
    ("MOP", 2),
    ("MXN", 2),
    ("MYR", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("PHP", 2),
    ("PLN", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TWD", 2),
    ("USD", 2),
    ("VND", 0),
    ("ZAR", 2),
];

/// The largest amount one operation may move, in minor units. Balances are
/// kept far below `i64::MAX` (see `BALANCE_LIMIT`), so no sum can overflow.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

/// No balance column may grow past this; the ledger refuses the write.
pub const BALANCE_LIMIT: i64 = 4_000_000_000_000_000_000;

/// The minor-unit digits of `code`, if it is a currency we accept.
pub fn minor_units(code: &str) -> Option<u8> {
    CURRENCIES
        .binary_search_by(|(c, _)| (*c).cmp(code))
        .ok()
        .map(|i| CURRENCIES[i].1)
}

/// Checks an amount and a currency from a request.
pub fn validate(amount: i64, currency: &str) -> Result<(), (&'static str, String)> {
    if minor_units(currency).is_none() {
        return Err((
            "currency",
            format!("{currency:?} is not a supported ISO 4217 code"),
        ));
    }
    if amount <= 0 {
        return Err(("amount", "must be a positive number of minor units".into()));
    }
    if amount > MAX_AMOUNT {
        return Err(("amount", format!("must be at most {MAX_AMOUNT}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_for_binary_search() {
        assert!(CURRENCIES.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn amounts_and_codes() {
        assert_eq!(minor_units("CNY"), Some(2));
        assert_eq!(minor_units("JPY"), Some(0));
        assert_eq!(minor_units("cny"), None);
        assert_eq!(minor_units("XXX"), None);
        assert!(validate(1, "CNY").is_ok());
        assert_eq!(validate(0, "CNY").unwrap_err().0, "amount");
        assert_eq!(validate(-5, "CNY").unwrap_err().0, "amount");
        assert_eq!(validate(MAX_AMOUNT + 1, "CNY").unwrap_err().0, "amount");
        assert_eq!(validate(10, "ABC").unwrap_err().0, "currency");
        // A column at the limit plus one more operation is still far from
        // i64::MAX, so the guarded SQL sums cannot overflow.
        assert!(BALANCE_LIMIT.checked_add(MAX_AMOUNT * 2).is_some());
    }
}
