"""Money: exact integer amounts in minor units, in a currency from a fixed ISO 4217 allow-list."""

from __future__ import annotations

from tessera.common.v1 import money_pb2

# Active ISO 4217 codes of circulating currencies (no funds codes, metals or test codes).
# A fixed list on purpose: a typo such as "EUE" must be refused, and the set changes rarely.
_CODES = """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP
    BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP
    GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR
    KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK
    MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR
    SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS
    UAH UGX USD UYU UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
"""
CURRENCY_CODES = frozenset(_CODES.split())

# The largest unit price: 10^12 minor units. With at most 100 lines of at most 10 000 units,
# an order total stays below 10^18, inside a signed 64-bit integer.
PRICE_MAX_MINOR = 10**12


def money(currency_code: str, amount_minor: int) -> money_pb2.Money:
    """The protobuf Money for an amount."""
    return money_pb2.Money(currency_code=currency_code, amount_minor=amount_minor)
