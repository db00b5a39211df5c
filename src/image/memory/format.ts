/**
 * Byte-level constants of the QEMU 7.2 migration stream (migration/savevm.c, migration/ram.c)
 * and of libvirt's `virsh save` header. docs/memory-stream.md describes the layout; every
 * number the parser and writer share lives here so the two cannot drift apart. The page size
 * (every offset and block length is a multiple of it) is util/page.ts.
 */
import { PAGE_SIZE } from '../../util/page.js';

/** "QEVM", big-endian, at the start of every stream. */
export const STREAM_MAGIC = 0x5145564d;
/** QEMU_VM_FILE_VERSION: the only version QEMU ≥ 1.x writes. */
export const STREAM_VERSION = 3;
/** QEMU_VM_FILE_VERSION_COMPAT: pre-1.0 streams, which we do not read. */
export const STREAM_VERSION_COMPAT = 2;

/** Top-level section type bytes (QEMU_VM_*). */
export const Section = {
  eof: 0x00,
  start: 0x01,
  part: 0x02,
  end: 0x03,
  full: 0x04,
  subsection: 0x05,
  vmdescription: 0x06,
  configuration: 0x07,
  command: 0x08,
  footer: 0x7e,
} as const;

/** RAM record flags: the low 12 bits of each record's be64 header (RAM_SAVE_FLAG_*). */
export const RamFlag = {
  /** Obsolete since QEMU 1.x; never written by 7.2. */
  full: 0x01,
  zero: 0x02,
  memSize: 0x04,
  page: 0x08,
  eos: 0x10,
  continue: 0x20,
  xbzrle: 0x40,
  /** RDMA's ram_control hook. */
  hook: 0x80,
  compressPage: 0x100,
  /** QEMU ≥ 8.0 with multifd; not in 7.2. */
  multifdFlush: 0x200,
} as const;

/** Mask of the flag bits in a record header. */
export const FLAG_MASK = PAGE_SIZE - 1;

/** The section name (idstr) and version of the RAM handler in 7.2. */
export const RAM_SECTION_NAME = 'ram';
export const RAM_SECTION_VERSION = 4;

/**
 * Upper bound on the total guest RAM we accept (64 TiB): more than any x86 guest can address,
 * small enough that a garbled MEM_SIZE is caught before it drives anything.
 */
export const MAX_RAM_BYTES = 2 ** 46;
/** Upper bound on the machine-type string of the configuration section. */
export const MAX_MACHINE_NAME = 256;
/** Upper bound on the capability list of the configuration section (7.2 knows ~25). */
export const MAX_CAPABILITIES = 256;

/** Configuration subsections that 7.2 may write (savevm.c vmstate_configuration). */
export const ConfigSubsection = {
  targetPageBits: 'configuration/target-page-bits',
  capabilities: 'configuration/capabilities',
  uuid: 'configuration/uuid',
} as const;

/** libvirt `virsh save` header (src/qemu/qemu_saveimage.h): 16 + 5 × 4 + 14 × 4 bytes. */
export const LIBVIRT_HEADER_SIZE = 92;
export const LIBVIRT_MAGIC = 'LibvirtQemudSave';
/** Written first and replaced by LIBVIRT_MAGIC once the save completed. */
export const LIBVIRT_PARTIAL_MAGIC = 'LibvirtQemudPart';
/** Header versions libvirt has written (QEMU_SAVE_VERSION). */
export const LIBVIRT_VERSIONS: readonly number[] = [1, 2];
/** Upper bound on libvirt's XML + cookie area. */
export const LIBVIRT_MAX_DATA = 64 * 1024 * 1024;
/** libvirt's save image formats, by the number stored in `compressed`. */
export const LIBVIRT_FORMATS: readonly string[] = ['raw', 'gzip', 'bzip2', 'xz', 'lzop', 'zstd'];
