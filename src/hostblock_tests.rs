use super::*;

#[test]
fn unescape_mount_field_turns_octal_escapes_into_bytes() {
    assert_eq!(
        unescape_mount_field(r"/mnt/my\040disk\134x"),
        r"/mnt/my disk\x"
    );
}

#[test]
fn unescape_mount_field_keeps_an_escape_beyond_a_byte_as_written() {
    assert_eq!(unescape_mount_field(r"/mnt/\777x\0"), r"/mnt/\777x\0");
}

#[test]
fn parse_mountinfo_reads_device_point_type_and_source_past_optional_fields() {
    let mounts = parse_mountinfo(
        "60 1 0:50 / /my\\040root rw,relatime shared:1 master:2 - zfs rpool/ROOT/debian rw\n\
         garbage line\n",
    );

    assert_eq!(
        mounts,
        [Mount {
            devnum: Some("0:50".into()),
            point: "/my root".into(),
            fstype: "zfs".into(),
            source: "rpool/ROOT/debian".into(),
        }]
    );
}

#[test]
fn a_mapper_name_without_a_dev_node_is_found_by_the_dm_name_attribute() {
    let dir = tempfile::tempdir().unwrap();
    let dm = dir.path().join("sys/class/block/dm-4/dm");
    std::fs::create_dir_all(&dm).unwrap();
    std::fs::write(dm.join("name"), "vg-home\n").unwrap();
    let root = SysfsRoot::new(dir.path());

    assert_eq!(
        name_of_dev_path(&root, "/dev/mapper/vg-home").as_deref(),
        Some("dm-4")
    );
}
