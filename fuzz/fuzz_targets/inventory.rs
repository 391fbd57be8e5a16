//! An image's inventory (stream 0), as `restore` and `show` read it: any bytes give a
//! decoded inventory or an error, never a panic, a hang or an allocation the input
//! does not justify; what decodes encodes back to what decodes the same.
#![no_main]
use ferry::image::Inventory;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(inv) = Inventory::decode(data) {
        let again = inv.encode().expect("a decoded inventory encodes");
        assert_eq!(Inventory::decode(&again).expect("and decodes again"), inv);
    }
    let _ = Inventory::read_from(&mut &data[..]);
});
