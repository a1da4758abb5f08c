"""Phone normalisation's fast paths agree with phonenumbers itself.

`normalize_phone` skips `phonenumbers.parse` for NANP numbers already in E.164 and validates
with `addresses.is_valid_number`, which leaves out the library's second pattern pass. Neither
may change a single answer: these tests compare both with the library's own functions.
"""

from __future__ import annotations

import phonenumbers
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from campaign_cli import addresses
from campaign_cli.addresses import (
    AddressError,
    is_valid_number,
    normalize_phone,
    normalize_webhook_url,
)

REGIONS = sorted(phonenumbers.SUPPORTED_REGIONS)
CALLING_CODES = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
TYPES = [PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE, PhoneNumberType.TOLL_FREE,
         PhoneNumberType.PREMIUM_RATE, PhoneNumberType.SHARED_COST, PhoneNumberType.VOIP,
         PhoneNumberType.PERSONAL_NUMBER, PhoneNumberType.PAGER, PhoneNumberType.UAN,
         PhoneNumberType.VOICEMAIL]


def library_normalize(text: str, region: str) -> str | None:
    """What `normalize_phone` returned before its fast paths: the library alone."""
    try:
        number = phonenumbers.parse(text.strip(), region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


def ours(text: str, region: str) -> str | None:
    try:
        return normalize_phone(text, region)
    except AddressError:
        return None


def example_numbers() -> list[phonenumbers.PhoneNumber]:
    """The library's example number of every region and type, and of every non-geographic code."""
    found = []
    for region in REGIONS:
        for kind in TYPES:
            number = phonenumbers.example_number_for_type(region, kind)
            if number is not None:
                found.append(number)
    for code in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS:
        number = phonenumbers.example_number_for_non_geo_entity(code)
        if number is not None:
            found.append(number)
    return found


EXAMPLES = example_numbers()


def test_the_examples_cover_every_shared_calling_code_and_both_answers() -> None:
    shared = {code for code, regions in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.items()
              if len(regions) > 1}
    assert shared <= {number.country_code for number in EXAMPLES}
    assert len(EXAMPLES) > 1000


def test_validity_agrees_with_the_library_on_every_example_number_and_its_neighbours() -> None:
    """Each example, and each example with one digit changed, one digit more and one less: a
    mix of valid and invalid numbers near the patterns' edges, in every region."""
    answers = {True: 0, False: 0}
    for example_number in EXAMPLES:
        digits = str(example_number.national_number)
        variants = {digits, digits + "0", digits[:-1] or "0"}
        for i in range(len(digits)):
            variants.add(digits[:i] + str((int(digits[i]) + 1) % 10) + digits[i + 1:])
        for variant in variants:
            number = phonenumbers.PhoneNumber(
                country_code=example_number.country_code, national_number=int(variant),
                italian_leading_zero=example_number.italian_leading_zero,
                number_of_leading_zeros=example_number.number_of_leading_zeros)
            expected = phonenumbers.is_valid_number(number)
            assert is_valid_number(number) is expected, number
            answers[expected] += 1
    assert answers[True] > 1000 and answers[False] > 1000  # the check saw both answers


@settings(max_examples=3000, deadline=None)
@given(code=st.sampled_from(CALLING_CODES), national=st.integers(min_value=0, max_value=10**14))
@example(code=1, national=2012000000)
@example(code=44, national=7624123456)  # Isle of Man: found by leading digits, not patterns
def test_validity_agrees_with_the_library_on_any_number(code: int, national: int) -> None:
    number = phonenumbers.PhoneNumber(country_code=code, national_number=national)
    assert is_valid_number(number) is phonenumbers.is_valid_number(number)


def test_an_unknown_calling_code_is_invalid() -> None:
    number = phonenumbers.PhoneNumber(country_code=999, national_number=2012000000)
    assert not is_valid_number(number)
    assert not phonenumbers.is_valid_number(number)


@settings(max_examples=2000, deadline=None)
@given(text=st.from_regex(r"\+1[2-9][0-9]{9}", fullmatch=True),
       region=st.sampled_from(["US", "CA", "GB", "DE", "JM", "BS", "FR", "IN", "AU"]))
@example(text="+12012000000", region="US")   # valid (New Jersey)
@example(text="+12002000000", region="US")   # area code 200 is not assigned: invalid
@example(text="+18765550100", region="JM")   # a Caribbean NANP region
def test_nanp_numbers_in_e164_normalise_as_the_library_does(text: str, region: str) -> None:
    assert ours(text, region) == library_normalize(text, region)


@pytest.mark.parametrize("text", [
    "+1 (201) 200-0000", "(201) 200-0000", "2012000000", "+1-201-200-0000", "+12012000000 ext 5",
    "+112012000000", "+11012000000", "+1201200000", "+120120000001", "+442079460958",
    "+44 7624 123456", "+79123456789", "+61 2 9876 5432", "tel:+1-201-200-0000", "+1２０１２０００００００",
    "not a phone", "+", "+0 201 200 0000",
])
@pytest.mark.parametrize("region", ["US", "GB"])
def test_other_spellings_still_go_through_the_library(text: str, region: str) -> None:
    assert ours(text, region) == library_normalize(text, region)


@settings(max_examples=1000, deadline=None)
@given(text=st.text(alphabet="+0123456789 ()-.x", min_size=1, max_size=20),
       region=st.sampled_from(["US", "GB", "DE"]))
def test_any_text_normalises_as_the_library_does(text: str, region: str) -> None:
    assert ours(text, region) == library_normalize(text, region)


def test_without_the_private_helper_the_library_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_number_type_helper` is phonenumbers' private function: a release without it must
    still validate (the library's own way), not fail to import or answer wrongly."""
    monkeypatch.setattr(addresses, "_number_type_helper", None)
    for number in EXAMPLES[::7]:
        assert is_valid_number(number) is phonenumbers.is_valid_number(number)
    assert normalize_phone("+12012000000") == "+12012000000"
    with pytest.raises(AddressError):
        normalize_phone("+12002000000")


@pytest.mark.parametrize("url", [
    "https://bot:pa55word@hooks.example.com:99999/services/T0/B0/s3cr3tpath?token=s3cr3tquery",
    "https://bot:pa55word@hooks.example.com/services/\x01/s3cr3tpath?token=s3cr3tquery",
])
def test_a_refused_webhook_url_is_named_by_its_origin_not_its_secrets(url: str) -> None:
    """The reason a row is `invalid` is shown by `status` (last errors) and `trace`, often in a
    CI log: a webhook's path and query are often its secret, its user info always is."""
    with pytest.raises(AddressError) as info:
        normalize_webhook_url(url)
    detail = str(info.value)
    assert "hooks.example.com" in detail and "/..." in detail
    assert not any(s in detail for s in ("s3cr3tpath", "s3cr3tquery", "pa55word", "bot:"))
