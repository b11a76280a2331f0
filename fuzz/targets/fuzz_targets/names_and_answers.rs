#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_fuzz_checks::names_and_answers(data));
