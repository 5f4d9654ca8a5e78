#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tarmac_testkit::fuzz::milter(data));
