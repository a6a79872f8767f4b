//! VmSpec -> VZVirtualMachineConfiguration. Only translation: every decision (validation, command line, Rosetta
//! plan, machine identifier) was made by the plain modules before this runs.

use std::fs::OpenOptions;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::path::Path;

use objc2::rc::Retained;
use objc2::{AnyThread, ClassType};
use objc2_foundation::{NSArray, NSData, NSError, NSFileHandle, NSString, NSURL};
use objc2_virtualization::{
    VZDirectorySharingDeviceConfiguration, VZDiskImageCachingMode,
    VZDiskImageStorageDeviceAttachment, VZDiskImageSynchronizationMode,
    VZEntropyDeviceConfiguration, VZFileHandleSerialPortAttachment, VZGenericMachineIdentifier,
    VZGenericPlatformConfiguration, VZLinuxBootLoader, VZLinuxRosettaDirectoryShare, VZMACAddress,
    VZMemoryBalloonDeviceConfiguration, VZNATNetworkDeviceAttachment, VZNetworkDeviceConfiguration,
    VZSerialPortConfiguration, VZSharedDirectory, VZSingleDirectoryShare,
    VZSocketDeviceConfiguration, VZStorageDeviceConfiguration, VZVirtioBlockDeviceConfiguration,
    VZVirtioConsoleDeviceSerialPortConfiguration, VZVirtioEntropyDeviceConfiguration,
    VZVirtioFileSystemDeviceConfiguration, VZVirtioNetworkDeviceConfiguration,
    VZVirtioSocketDeviceConfiguration, VZVirtioTraditionalMemoryBalloonDeviceConfiguration,
    VZVirtualMachineConfiguration,
};

use crate::engine::EngineError;
use crate::spec::{TAG_ROSETTA, VmSpec};

/// The framework's own explanation of an error.
pub(super) fn describe(error: &NSError) -> String {
    error.localizedDescription().to_string()
}

fn file_url(path: &Path) -> Result<Retained<NSURL>, EngineError> {
    NSURL::from_file_path(path).ok_or_else(|| {
        EngineError::InvalidSpec(format!("{} cannot be used as a file URL", path.display()))
    })
}

fn dir_url(path: &Path) -> Result<Retained<NSURL>, EngineError> {
    NSURL::from_directory_path(path).ok_or_else(|| {
        EngineError::InvalidSpec(format!(
            "{} cannot be used as a directory URL",
            path.display()
        ))
    })
}

/// A new machine identifier's bytes.
pub(super) fn new_machine_identifier() -> Vec<u8> {
    // SAFETY: plain object creation.
    unsafe { VZGenericMachineIdentifier::new().dataRepresentation() }.to_vec()
}

/// Whether the framework accepts `bytes` as a machine identifier.
pub(super) fn machine_identifier_is_valid(bytes: &[u8]) -> bool {
    let data = NSData::with_bytes(bytes);
    // SAFETY: `data` is a valid NSData; the initializer returns nil for data it does not understand.
    unsafe {
        VZGenericMachineIdentifier::initWithDataRepresentation(
            VZGenericMachineIdentifier::alloc(),
            &data,
        )
    }
    .is_some()
}

/// Builds and validates the configuration. `console_write` becomes the guest's console output (the engine reads
/// the other end of the pipe); guest console input is /dev/null.
pub(super) fn build(
    spec: &VmSpec,
    cmdline: &str,
    rosetta_share: bool,
    machine_id: &[u8],
    console_write: OwnedFd,
) -> Result<Retained<VZVirtualMachineConfiguration>, EngineError> {
    // SAFETY (whole function): every call is a documented initializer or setter of a configuration object that
    // no other thread can see yet; arguments are valid objects created just above.
    unsafe {
        let config = VZVirtualMachineConfiguration::new();
        config.setCPUCount(spec.cpus as usize);
        config.setMemorySize(spec.memory_mib * 1024 * 1024);

        // Boot loader: kernel, initrd, command line (the spec's arguments + console=hvc0).
        let kernel = file_url(&spec.kernel)?;
        let initrd = file_url(&spec.initrd)?;
        let boot = VZLinuxBootLoader::initWithKernelURL(VZLinuxBootLoader::alloc(), &kernel);
        boot.setInitialRamdiskURL(Some(&initrd));
        boot.setCommandLine(&NSString::from_str(cmdline));
        config.setBootLoader(Some(boot.as_super()));

        // Platform with the persisted machine identifier.
        let id = VZGenericMachineIdentifier::initWithDataRepresentation(
            VZGenericMachineIdentifier::alloc(),
            &NSData::with_bytes(machine_id),
        )
        .ok_or_else(|| {
            EngineError::InvalidSpec("the stored machine identifier was rejected".into())
        })?;
        let platform = VZGenericPlatformConfiguration::new();
        platform.setMachineIdentifier(&id);
        config.setPlatform(platform.as_super());

        // Disk. Caching: `Cached` (host page cache). `Automatic` picks uncached I/O on local disks, and Linux guests
        // on virtio-blk have shown ext4 corruption with it (UTM #4840, lima #1957); the page cache survives a crash
        // of this process, so caching loses nothing the guest has not been told is unflushed.
        // Synchronization: `Full`. A guest flush (ext4 journal commit, the Nix database's fsync) becomes
        // F_FULLFSYNC, which reaches permanent storage; `Fsync` on macOS only reaches the drive's volatile cache, so
        // a host power loss or panic could drop writes the guest believes durable. `Full` costs flush latency, not
        // throughput; `None` is never acceptable for a disk that is reused.
        let disk = file_url(&spec.disk.path)?;
        let attachment = VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_cachingMode_synchronizationMode_error(
            VZDiskImageStorageDeviceAttachment::alloc(),
            &disk,
            spec.disk.read_only,
            VZDiskImageCachingMode::Cached,
            VZDiskImageSynchronizationMode::Full,
        )
        .map_err(|e| {
            EngineError::InvalidSpec(format!("disk image {} cannot be attached: {}", spec.disk.path.display(), describe(&e)))
        })?;
        let block = VZVirtioBlockDeviceConfiguration::initWithAttachment(
            VZVirtioBlockDeviceConfiguration::alloc(),
            &attachment,
        );
        let storage: [&VZStorageDeviceConfiguration; 1] = [block.as_super()];
        config.setStorageDevices(&NSArray::from_slice(&storage));

        // Network: NAT with the instance's MAC.
        let mac = VZMACAddress::initWithString(
            VZMACAddress::alloc(),
            &NSString::from_str(&spec.network.mac),
        )
        .ok_or_else(|| {
            EngineError::InvalidSpec(format!("MAC address {:?} was rejected", spec.network.mac))
        })?;
        let net = VZVirtioNetworkDeviceConfiguration::new();
        net.setMACAddress(&mac);
        net.setAttachment(Some(VZNATNetworkDeviceAttachment::new().as_super()));
        let nets: [&VZNetworkDeviceConfiguration; 1] = [net.as_super()];
        config.setNetworkDevices(&NSArray::from_slice(&nets));

        // virtio-fs: one device per tag, plus Rosetta.
        let mut shares: Vec<Retained<VZDirectorySharingDeviceConfiguration>> = Vec::new();
        for share in &spec.shares {
            let url = dir_url(&share.host_path)?;
            let dir = VZSharedDirectory::initWithURL_readOnly(
                VZSharedDirectory::alloc(),
                &url,
                share.read_only,
            );
            let single =
                VZSingleDirectoryShare::initWithDirectory(VZSingleDirectoryShare::alloc(), &dir);
            shares.push(fs_device(&share.tag, single.as_super())?);
        }
        if rosetta_share {
            let rosetta =
                VZLinuxRosettaDirectoryShare::initWithError(VZLinuxRosettaDirectoryShare::alloc())
                    .map_err(|e| EngineError::Missing {
                        what: "Rosetta".into(),
                        hint: describe(&e),
                    })?;
            shares.push(fs_device(TAG_ROSETTA, rosetta.as_super())?);
        }
        config.setDirectorySharingDevices(&NSArray::from_retained_slice(&shares));

        // vsock.
        let vsock = VZVirtioSocketDeviceConfiguration::new();
        let sockets: [&VZSocketDeviceConfiguration; 1] = [vsock.as_super()];
        config.setSocketDevices(&NSArray::from_slice(&sockets));

        // Console (hvc0): output into our pipe, input from /dev/null.
        let null = OpenOptions::new()
            .read(true)
            .open("/dev/null")
            .map_err(|e| EngineError::io("opening /dev/null for the console input", e))?;
        let input = NSFileHandle::initWithFileDescriptor_closeOnDealloc(
            NSFileHandle::alloc(),
            null.into_raw_fd(),
            true,
        );
        let output = NSFileHandle::initWithFileDescriptor_closeOnDealloc(
            NSFileHandle::alloc(),
            console_write.into_raw_fd(),
            true,
        );
        let serial_attachment =
            VZFileHandleSerialPortAttachment::initWithFileHandleForReading_fileHandleForWriting(
                VZFileHandleSerialPortAttachment::alloc(),
                Some(&input),
                Some(&output),
            );
        let console = VZVirtioConsoleDeviceSerialPortConfiguration::new();
        console.setAttachment(Some(serial_attachment.as_super()));
        let serials: [&VZSerialPortConfiguration; 1] = [console.as_super()];
        config.setSerialPorts(&NSArray::from_slice(&serials));

        // Entropy and memory balloon.
        let entropy = VZVirtioEntropyDeviceConfiguration::new();
        let entropies: [&VZEntropyDeviceConfiguration; 1] = [entropy.as_super()];
        config.setEntropyDevices(&NSArray::from_slice(&entropies));
        let balloon = VZVirtioTraditionalMemoryBalloonDeviceConfiguration::new();
        let balloons: [&VZMemoryBalloonDeviceConfiguration; 1] = [balloon.as_super()];
        config.setMemoryBalloonDevices(&NSArray::from_slice(&balloons));

        config.validateWithError().map_err(|e| {
            EngineError::InvalidSpec(format!(
                "Virtualization.framework rejected the VM configuration: {}",
                describe(&e)
            ))
        })?;
        Ok(config)
    }
}

/// A virtio-fs device for `tag` serving `share`.
///
/// # Safety
/// Called only while building a configuration (see `build`).
unsafe fn fs_device(
    tag: &str,
    share: &objc2_virtualization::VZDirectoryShare,
) -> Result<Retained<VZDirectorySharingDeviceConfiguration>, EngineError> {
    let tag_ns = NSString::from_str(tag);
    // SAFETY: class method on a valid string; then initializer and setter on a fresh object.
    unsafe {
        VZVirtioFileSystemDeviceConfiguration::validateTag_error(&tag_ns).map_err(|e| {
            EngineError::InvalidSpec(format!(
                "virtio-fs tag {tag:?} is invalid: {}",
                describe(&e)
            ))
        })?;
        let device = VZVirtioFileSystemDeviceConfiguration::initWithTag(
            VZVirtioFileSystemDeviceConfiguration::alloc(),
            &tag_ns,
        );
        device.setShare(Some(share));
        Ok(Retained::into_super(device))
    }
}
